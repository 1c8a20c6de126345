"""`lessons`: the command line, the typed params.yaml configuration, datasets, logging."""

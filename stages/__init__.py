"""One module per pipeline stage (`lessons <stage>`), plus the math and training loops they share."""

"""Bounds that keep the loss a number: temperatures where the KD loss is finite in float32, a
NaN/inf loss that names the knob behind it, and YAML 1.1 floats read as text."""
from __future__ import annotations

import pytest
import yaml

from tests.reliability.conftest import cli, one_line_error


# -- 3. YAML 1.1 floats ------------------------------------------------------------------------

@pytest.mark.parametrize("line, key, spelling", [
    ("temperature:\n  max_temperature: 1.0e30\n", "temperature.max_temperature", "1.0e+30"),
    ("student_train:\n  lr: 1e-3\n", "student_train.lr", "1.0e-3"),
    ("temperature:\n  beta: '0.5'\n", "temperature.beta", "0.5"),
])
def test_a_float_yaml_read_as_text_says_so_and_gives_the_spelling_it_reads(tmp_path, line, key, spelling):
    path = tmp_path / "params.yaml"
    path.write_text(line)
    error = one_line_error(cli(path, "check-params"), key, "YAML read", "as text", f"write {spelling}")
    assert error.endswith(f"write {spelling}")
    written = line.split(": ", 1)[1].strip()
    assert yaml.safe_load(spelling) == float(written.strip("'"))  # the same number, read as one
    path.write_text(line.replace(written, spelling))
    assert "YAML read" not in cli(path, "check-params").output

"""`dvc plots show` on the plots dvc.yaml declares: the vega-lite spec it renders reads right."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _plot_spec(tmp_path: Path, plot: str, rows: list[dict]) -> dict:
    """The vega-lite spec `dvc plots show --json` gives for `plot` (filled with `rows`), in a dvc
    project holding this repository's dvc.yaml, params.yaml and plot templates."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    (tmp_path / plot).parent.mkdir(parents=True)
    (tmp_path / plot).write_text(json.dumps(rows))
    shown = subprocess.run(
        ["dvc", "plots", "show", "--json", plot],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    [entry] = json.loads(shown.stdout)["data"][plot]
    return entry["content"]


def test_the_temperature_histogram_has_count_as_a_quantitative_axis_from_zero(tmp_path):
    rows = [{"temperature": 1.0 + 0.5 * k, "count": k * (14 - k)} for k in range(15)]
    spec = _plot_spec(tmp_path, "plots/temperature/cnn_small.json", rows)
    encoding = spec["encoding"]
    assert (encoding["y"]["field"], encoding["y"]["type"]) == ("count", "quantitative")
    assert encoding["y"]["scale"]["zero"] is True
    assert (encoding["x"]["field"], encoding["x"]["type"], encoding["x"]["sort"]) == (
        "temperature",
        "ordinal",
        "ascending",
    )
    assert spec["mark"]["type"] == "bar"
    assert [(row["temperature"], row["count"]) for row in spec["data"]["values"]] == [
        (row["temperature"], row["count"]) for row in rows
    ]
    assert "<DVC_METRIC" not in json.dumps(spec)  # every anchor of the template was filled

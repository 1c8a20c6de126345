"""Unit tests for the report stage (stages.report): table values by hand, files on disk."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages.report import (
    MISSING,
    aggregate_experiments,
    format_signed,
    near_chance,
    online_table,
    order_rows,
    run,
    shared_settings,
    student_table,
    summary_markdown,
    teacher_table,
    within_spread,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = SimpleNamespace(baseline="ce", kd_baseline="kd")


def student(experiment: str, top1: float, seed: int = 0, **extra) -> dict:
    kd = experiment != "ce"
    record = {
        "experiment": experiment,
        "teacher": "cnn_small",
        "kd": kd,
        "adjust": "ps" if "ps" in experiment else "none",
        "dtd": "flsw" if "flsw" in experiment else "off",
        "arch": "cnn_tiny",
        "epochs": 3,
        "seed": seed,
        "lr": 0.05,
        "alpha": 0.9 if kd else 0.0,
        "test_top1": top1,
        "test_top5": 0.99,
        "wall_s": 50.0,
        "images_per_s": 4000.0,
        "parameters": 12345,
    }
    record.update(extra)
    return record


def column(header: list[str], body: list[list[str]], name: str) -> dict[str, str]:
    """experiment -> the cell of column `name`."""
    k = header.index(name)
    return {cells[0]: cells[k] for cells in body}


def table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    rows = order_rows(aggregate_experiments(records), "ce", "kd")
    return student_table(rows, "ce", "kd")


# --- table values ------------------------------------------------------------------------------


def test_delta_columns_are_percentage_point_differences_of_top1():
    header, body = table([student("kd_ps", 0.83), student("ce", 0.80), student("kd", 0.82)])
    assert column(header, body, "Δ vs ce") == {"ce": "+0.00", "kd": "+2.00", "kd_ps": "+3.00"}
    assert column(header, body, "Δ vs kd") == {"ce": "-2.00", "kd": "+0.00", "kd_ps": "+1.00"}
    assert column(header, body, "student top-1") == {"ce": "80.00", "kd": "82.00", "kd_ps": "83.00"}


def test_the_ka_column_names_an_overridden_fixed_row_temperature():
    header, body = table(
        [
            student("kd_lsr", 0.8, adjust="lsr", fixed_target_temperature=1.0),
            student("kd_lsr_t2", 0.8, adjust="lsr", fixed_target_temperature=2.0),
        ]
    )
    # 1.0 is the default (DESIGN §4: the plain student distribution on fixed rows), so unnamed
    assert column(header, body, "KA") == {"kd_lsr": "lsr", "kd_lsr_t2": "lsr (fixed rows at τ 2)"}


def test_the_kd_column_names_the_logit_kd_loss_and_dkds_weights():
    from stages.report import student_record

    def written(name: str, **config) -> dict:  # a run's metrics and its config record
        resolved = {"kd": name != "ce", "adjust": "none", "dtd": "off", **config}
        return student_record({"test_top1": 0.8}, {"experiment": name, "seed": 0, "config": resolved})

    header, body = table(
        [
            written("ce"),
            written("kd", loss="kd", dkd_alpha=1.0, dkd_beta=8.0),
            written("old_kd"),  # written before the loss key existed
            written("dkd", loss="dkd", dkd_alpha=1.0, dkd_beta=8.0),
            written("dkd_warm", loss="dkd", dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup=20),
            written("ttm", loss="ttm", dkd_alpha=1.0, dkd_beta=8.0),
            student("ls", 0.8, loss="ls"),
        ]
    )
    assert column(header, body, "KD") == {
        "ce": "no",
        "kd": "yes",
        "old_kd": "yes",
        "dkd": "dkd (α 1, β 8)",
        "dkd_warm": "dkd (α 1, β 8, warm-up 20 epochs)",
        "ttm": "ttm",
        "ls": "ls",
    }


def test_runs_of_one_experiment_with_different_losses_are_rejected():
    with pytest.raises(Exception, match="runs differ in loss"):
        aggregate_experiments([student("x", 0.8, seed=0, loss="kd"), student("x", 0.8, seed=1, loss="ttm")])


def test_online_experiments_sit_beside_their_offline_twin():
    rows = aggregate_experiments(
        [
            student("kd", 0.80, seed=0, wall_s=10.0, images_per_s=500.0),
            student("kd", 0.82, seed=1, wall_s=12.0, images_per_s=400.0),
            student("kd_online", 0.83, seed=0, teacher_mode="online", wall_s=30.0, images_per_s=150.0),
            student("kd_online", 0.81, seed=1, teacher_mode="online", wall_s=30.0, images_per_s=150.0),
            student("kd_ps", 0.70, adjust="ps", teacher_mode="offline"),
        ]
    )
    header, body = online_table(rows)
    assert len(body) == 1
    cells = dict(zip(header, body[0], strict=True))
    assert (cells["offline"], cells["online"]) == ("kd", "kd_online")
    assert cells["offline top-1"].startswith("81.00 ± 1.41") and cells["online top-1"].startswith(
        "82.00 ± 1.41"
    )
    assert cells["Δ"].startswith("+1.00") and (cells["offline s"], cells["online s"]) == ("11", "30")
    assert (cells["offline img/s"], cells["online img/s"]) == ("450", "150")


def test_rows_are_baseline_then_kd_baseline_then_by_name():
    _, body = table([student(name, 0.8) for name in ("kd_ps", "kd_lsr", "kd", "ce", "a_kd")])
    assert [cells[0] for cells in body] == ["ce", "kd", "a_kd", "kd_lsr", "kd_ps"]


def test_runs_differing_only_in_seed_give_mean_sample_std_and_n():
    records = [
        student("kd_ps", 0.80, seed=0),
        student("kd_ps", 0.84, seed=1),
        student("kd_ps", 0.82, seed=2),
        student("ce", 0.79),
    ]
    (ce, kd_ps) = order_rows(aggregate_experiments(records), "ce", "kd")
    # mean 0.82; deviations -0.02, +0.02, 0 -> sample variance 0.0008 / 2 = 0.0004, std 0.02.
    assert (kd_ps.n, ce.n) == (3, 1)
    assert kd_ps.top1_mean == pytest.approx(0.82, abs=1e-12)
    assert kd_ps.top1_std == pytest.approx(0.02, abs=1e-12)
    assert ce.top1_std is None
    header, body = student_table([ce, kd_ps], "ce", "kd")
    assert column(header, body, "student top-1")["kd_ps"] == "82.00 ± 2.00"
    assert column(header, body, "n") == {"ce": "1", "kd_ps": "3"}
    assert column(header, body, "Δ vs ce")["kd_ps"] == "+3.00"


def test_a_missing_baseline_renders_a_dash_in_its_delta_column():
    header, body = table([student("ce", 0.80), student("kd_ps", 0.83)])
    assert column(header, body, "Δ vs kd") == {"ce": MISSING, "kd_ps": MISSING}
    assert column(header, body, "Δ vs ce")["kd_ps"] == "+3.00"


def test_teacher_columns_show_a_dash_when_the_student_has_no_teacher():
    header, body = table([student("ce", 0.80, teacher=None)])
    assert column(header, body, "teacher")["ce"] == MISSING
    assert column(header, body, "teacher top-1")["ce"] == MISSING
    assert column(header, body, "agreement")["ce"] == MISSING


def test_teacher_side_columns_are_formatted_from_the_student_metrics():
    record = student("kd", 0.82, teacher_test_top1=0.91, agreement_top1=0.93, mean_kl_teacher=0.12)
    header, body = table([record])
    assert [
        column(header, body, name)["kd"]
        for name in ("teacher top-1", "agreement", "KL(teacher‖student)", "time (s)")
    ] == ["91.00", "93.00", "0.1200", "50.0"]


def test_a_negative_delta_that_rounds_to_zero_is_shown_as_plus_zero():
    assert format_signed(-0.001) == "+0.00"
    assert format_signed(-0.5) == "-0.50"
    assert format_signed(None) == MISSING


def test_runs_of_one_experiment_with_the_same_seed_are_rejected():
    with pytest.raises(ValueError, match="same seed"):
        aggregate_experiments([student("kd", 0.8, seed=1), student("kd", 0.81, seed=1)])


def test_runs_of_one_experiment_with_different_settings_are_rejected():
    with pytest.raises(ValueError, match="differ in alpha"):
        aggregate_experiments([student("kd", 0.8, seed=0), student("kd", 0.8, seed=1, alpha=0.5)])


def test_summary_markdown_names_every_experiment_and_the_dataset():
    rows = aggregate_experiments([student("ce", 0.8), student("kd_ps_flsw", 0.83)])
    text = summary_markdown(rows, baseline="ce", kd_baseline="kd", dataset="fashion_mnist")
    assert "Dataset: fashion_mnist." in text
    assert "| ce |" in text and "| kd_ps_flsw |" in text


def test_the_strays_line_names_the_params_file_the_report_was_run_with():
    rows = aggregate_experiments([student("ce", 0.8)])
    default = summary_markdown(rows, baseline="ce", kd_baseline="kd", strays=["old.json"])
    named = summary_markdown(
        rows, baseline="ce", kd_baseline="kd", strays=["old.json"], params_name="small.yaml"
    )
    assert "Not shown, as params.yaml does not configure them (left on disk): `old.json`." in default
    assert "Not shown, as small.yaml does not configure them (left on disk): `old.json`." in named


# --- run ---------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture()
def inputs(tmp_path: Path) -> dict:
    """A small pipeline output tree: 3 experiments (kd_ps with two seeds), one teacher."""
    metrics, plots = tmp_path / "metrics", tmp_path / "plots"
    runs = {
        "ce": student("ce", 0.80),
        "kd": student("kd", 0.82, teacher_test_top1=0.91),
        "kd_ps": student("kd_ps", 0.83),
        "kd_ps-seed1": student("kd_ps", 0.85, seed=1),
    }
    students = [write_json(metrics / "students" / f"{stem}.json", r) for stem, r in runs.items()]
    curves = [
        write_json(
            plots / "students" / f"{stem}.json",
            [
                {
                    "epoch": e,
                    "train_loss": 1.0 / e,
                    "test_top1": r["test_top1"] - 0.1 / e,
                    "test_top5": 0.99,
                    "lr": 0.05,
                    "elapsed_s": 10.0 * e,
                }
                for e in (1, 2, 3)
            ],
        )
        for stem, r in runs.items()
    ]
    teacher = write_json(
        metrics / "teachers" / "cnn_small.json",
        {
            "teacher": "cnn_small",
            "arch": "cnn_small",
            "epochs": 3,
            "train_top1": 0.95,
            "test_top1": 0.91,
            "test_top5": 0.998,
            "checkpoint_sha256": "ab" * 32,
            "wall_s": 120.5,
            "images_per_s": 5000.0,
            "parameters": 99999,
        },
    )
    adjust = write_json(
        metrics / "adjust" / "cnn_small-ps.json",
        {
            "method": "ps",
            "rewritten_views": 500,
            "rewritten_fraction": 0.05,
            "teacher_train_accuracy": 0.95,
            "rewrites_per_class": [50] * 10,
            "elapsed_s": 1.0,
        },
    )
    temperature = write_json(
        metrics / "temperature" / "cnn_small.json",
        {
            "omega_teacher_mean": 1.2,
            "static_temperature_mean": 4.0,
            "static_temperature_std": 0.25,
            "static_temperature_p05": 3.5,
            "static_temperature_p50": 4.1,
            "static_temperature_p95": 4.4,
            "elapsed_s": 2.0,
        },
    )
    histogram = write_json(
        plots / "temperature" / "cnn_small.json",
        [{"temperature": 1.0 + 0.5 * k, "count": k * (14 - k)} for k in range(15)],
    )
    return dict(
        students=students,
        teachers=[teacher],
        adjust_metrics=[adjust],
        temperature_metrics=[temperature],
        temperature_histograms=[histogram],
        curves=curves,
        out_dir=tmp_path / "reports",
    )


def test_run_writes_a_summary_with_every_section_and_three_valid_pngs(inputs):
    summary_path = run(CONFIG, **inputs)
    out_dir = inputs["out_dir"]
    assert summary_path == out_dir / "summary.md"
    text = summary_path.read_text(encoding="utf-8")
    for needle in (
        "## Teachers",
        "| cnn_small | cnn_small | 91.00 | 95.00 | 3 | 120.5 |",
        "| cnn_small | ps | 500 | 5.00 | 95.00 |",
        "static τ = 4.000 ± 0.250",
        "p5 / p50 / p95 = 3.500 / 4.100 / 4.400",
        "(accuracy.png)",
        "(curves.png)",
        "(temperature.png)",
    ):
        assert needle in text
    student_lines = [line for line in text.splitlines() if line.startswith(("| ce ", "| kd"))]
    assert [line.split(" | ")[0] for line in student_lines] == ["| ce", "| kd", "| kd_ps"]
    # kd_ps: mean of 0.83 and 0.85 = 0.84, sample std sqrt(2 * 0.01^2 / 1) = 1.41 pp, n = 2.
    assert "| kd_ps | 2 | cnn_small | yes | ps | off | 91.00 | 84.00 ± 1.41 | 99.00 | +4.00 | +2.00 |" in text
    for name in ("accuracy.png", "curves.png", "temperature.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "accuracy.png",
        "curves.png",
        "summary.md",
        "temperature.png",
    ]  # no temporary files left


def test_run_is_byte_for_byte_reproducible(inputs, tmp_path):
    run(CONFIG, **inputs)
    first = {p.name: p.read_bytes() for p in inputs["out_dir"].iterdir()}
    run(CONFIG, **{**inputs, "out_dir": tmp_path / "again"})
    second = {p.name: p.read_bytes() for p in (tmp_path / "again").iterdir()}
    assert first == second


def test_run_without_student_metrics_raises():
    with pytest.raises(ValueError, match="no student metrics"):
        run(
            CONFIG,
            students=[],
            teachers=[],
            adjust_metrics=[],
            temperature_metrics=[],
            temperature_histograms=[],
            out_dir="unused",
        )


def test_run_names_a_missing_file(inputs, tmp_path):
    missing = tmp_path / "metrics" / "students" / "absent.json"
    with pytest.raises(ValueError, match=f"{missing}: file not found"):
        run(CONFIG, **{**inputs, "students": [*inputs["students"], missing]})
    assert not inputs["out_dir"].exists()  # nothing written before the inputs are checked


def test_run_names_a_file_that_is_not_json(inputs, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=f"{broken}: not valid JSON"):
        run(CONFIG, **{**inputs, "temperature_metrics": [broken]})


def test_run_names_a_file_without_the_required_keys(inputs, tmp_path):
    wrong = write_json(tmp_path / "wrong.json", {"experiment": "kd"})
    with pytest.raises(ValueError, match=f"{wrong}: missing key.*test_top1"):
        run(CONFIG, **{**inputs, "students": [wrong]})


def test_run_with_only_student_metrics_still_writes_every_output(inputs, tmp_path):
    out_dir = tmp_path / "minimal"
    run(
        CONFIG,
        students=inputs["students"][:1],
        teachers=[],
        adjust_metrics=[],
        temperature_metrics=[],
        temperature_histograms=[],
        out_dir=out_dir,
    )
    text = (out_dir / "summary.md").read_text(encoding="utf-8")
    assert "| ce |" in text and "## Teachers" not in text
    for name in ("accuracy.png", "curves.png", "temperature.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG_MAGIC


def test_a_baseline_that_is_not_an_experiment_is_warned_about(inputs, tmp_path, caplog):
    config = SimpleNamespace(baseline="nope", kd_baseline="kd")
    with caplog.at_level("WARNING", logger="stages.report"):
        run(config, **{**inputs, "out_dir": tmp_path / "r"})
    assert "report.baseline is 'nope', which is not among the experiments" in caplog.text
    assert "kd_baseline" not in caplog.text


# --- the configured runs only (params.yaml), strays named and kept -----------------------------

ROOT = Path(__file__).resolve().parents[2]


def write_pipeline_outputs(
    root: Path, top1: dict[tuple[str, int], float], teachers: tuple[str, ...] = ("t", "old")
) -> None:
    """metrics/ and plots/ as the pipeline writes them: one student run per (experiment, seed),
    teachers t (configured) and old (not), KA method ps for each."""
    for (name, seed), value in top1.items():
        write_json(
            root / "metrics" / "students" / f"{name}-seed{seed}.json",
            student(name, value, seed=seed, teacher="t", adjust="none", dtd="off"),
        )
        write_json(
            root / "plots" / "students" / f"{name}-seed{seed}.json",
            [{"epoch": e, "test_top1": value - 0.1 / e} for e in (1, 2, 3)],
        )
    for teacher in teachers:
        write_json(
            root / "metrics" / "teachers" / f"{teacher}.json",
            {"teacher": teacher, "arch": "cnn_small", "test_top1": 0.91 if teacher == "t" else 0.5},
        )
        write_json(
            root / "metrics" / "adjust" / f"{teacher}-ps.json",
            {"method": "ps", "rewritten_views": 7 if teacher == "t" else 999, "rewritten_fraction": 0.07},
        )


def report_cli(root: Path, seeds: list[int], experiments: tuple[str, ...] = ("a",)):
    from click.testing import CliRunner

    from pipeline.cli import main

    params = root / "params.yaml"
    params.write_text(
        json.dumps(
            {  # JSON is YAML
                "teacher_train": {"teachers": {"t": {"arch": "cnn_small"}}},
                "adjust": {"methods": ["ps"]},
                "student_train": {
                    "seeds": seeds,
                    "experiments": {name: {"teacher": "t"} for name in experiments},
                },
                "report": {"baseline": "a", "kd_baseline": "kd"},
            }
        )
    )
    return CliRunner().invoke(
        main,
        [
            "--params",
            str(params),
            "report",
            "--students",
            str(root / "metrics" / "students"),
            "--curves",
            str(root / "plots" / "students"),
            "--metrics-root",
            str(root / "metrics"),
            "--histograms",
            str(root / "plots" / "temperature"),
            "--out",
            str(root / "reports"),
        ],
        obj={},
    )


ON_DISK = {("a", 0): 0.70, ("a", 1): 0.74, ("b", 0): 0.90, ("b", 1): 0.94}


@pytest.mark.parametrize(
    "seeds, top1_cell, strays",
    [
        (
            [0],
            "| a | 1 | t | yes | none | off | 91.00 | 70.00 | 99.00 | +0.00 |",
            ["a-seed1", "b-seed0", "b-seed1"],
        ),
        # a over seeds 0 and 1: mean 0.72, sample std sqrt(2 * 0.02^2 / 1) = 2.83 pp.
        (
            [0, 1],
            "| a | 2 | t | yes | none | off | 91.00 | 72.00 ± 2.83 | 99.00 | +0.00 |",
            ["b-seed0", "b-seed1"],
        ),
    ],
)
def test_the_report_shows_exactly_the_configured_runs_and_names_the_strays(
    tmp_path, seeds, top1_cell, strays
):
    messy, clean = tmp_path / "messy", tmp_path / "clean"
    write_pipeline_outputs(messy, ON_DISK)
    write_pipeline_outputs(
        clean, {run: v for run, v in ON_DISK.items() if run[0] == "a" and run[1] in seeds}, teachers=("t",)
    )
    before = sorted(p.relative_to(messy) for p in messy.rglob("*.json"))
    result = report_cli(messy, seeds)
    assert result.exit_code == 0, result.output
    text = (messy / "reports" / "summary.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | t | " in line]
    assert rows == [line for line in text.splitlines() if line.startswith(("| a ", "| b "))]
    assert len(rows) == 1 and rows[0].startswith(top1_cell), rows
    assert [line for line in text.splitlines() if line.startswith("| t ") or line.startswith("| old ")] == [
        "| t | cnn_small | 91.00 | – | – | – |",
        "| t | ps | 7 | 7.00 | – |",
    ]
    expected = (
        [f"metrics/students/{s}.json" for s in strays]
        + [f"plots/students/{s}.json" for s in strays]
        + ["metrics/adjust/old-ps.json", "metrics/teachers/old.json"]
    )
    (stray_line,) = [line for line in text.splitlines() if line.startswith("Not shown")]
    assert sorted(stray_line.split("`")[1::2]) == sorted(str(messy / rel) for rel in expected)
    (warning,) = [line for line in result.stderr.splitlines() if "params.yaml does not configure" in line]
    assert warning.startswith("WARNING stages.report: report: ") and "(not deleted)" in warning
    assert all(str(messy / rel) in warning for rel in expected)
    assert sorted(p.relative_to(messy) for p in messy.rglob("*.json")) == before  # nothing deleted
    # Plots: byte for byte those of a folder that holds only the configured runs' files.
    assert report_cli(clean, seeds).exit_code == 0
    for png in ("accuracy.png", "curves.png", "temperature.png"):
        assert (messy / "reports" / png).read_bytes() == (clean / "reports" / png).read_bytes(), png
    assert text.replace(stray_line + "\n\n", "").replace(str(messy), str(clean)) == (
        clean / "reports" / "summary.md"
    ).read_text(encoding="utf-8")


def test_a_configured_run_without_metrics_is_a_one_line_error_naming_it(tmp_path):
    write_pipeline_outputs(tmp_path, {("a", 0): 0.7})
    result = report_cli(tmp_path, [0, 2])
    assert result.exit_code == 1
    missing = tmp_path / "metrics" / "students" / "a-seed2.json"
    assert result.output == (
        f"Error: {missing}: file not found (experiment 'a', seed 2); run the stage "
        "that writes it first (`dvc repro`)\n"
    )
    assert not (tmp_path / "reports").exists()


def test_the_report_stage_lists_every_params_key_the_report_reads():
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]
    assert set(stage["params"]) == {
        "report",
        "data.name",
        "student_train.experiments",
        "student_train.seeds",
        "teacher_train.teachers",
        "adjust.methods",
    }


def test_removing_an_experiment_or_a_seed_marks_the_report_stage_changed_in_dvc_status(tmp_path, monkeypatch):
    # The report stage of dvc.yaml as it is, in a dvc project of its own (a no-op command, no
    # deps or outs), locked once; then each edit of params.yaml must make it out of date.
    import yaml
    from dvc.repo import Repo

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"report": {"cmd": "true", "params": stage["params"]}}})
    )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["student_train"]["seeds"] = [0, 1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo = Repo.init(str(tmp_path), no_scm=True)
    repo.reproduce("report")
    assert repo.status() == {}
    for edit in (
        lambda p: p["student_train"]["experiments"].pop("kd_ps"),
        lambda p: p["student_train"]["seeds"].remove(1),
    ):
        edited = yaml.safe_load(yaml.safe_dump(params))
        edit(edited)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited))
        assert list(repo.status()) == ["report"]


# --- settings, split sizes, near chance, seed spread, val column -------------------------------


def test_the_settings_column_lists_each_experiments_overrides_and_the_temperature_of_dtd_runs():
    temperature = {
        "base_temperature": 4.0,
        "beta": 0.5,
        "gamma": 2.0,
        "min_temperature": 1.0,
        "max_temperature": 8.0,
        "histogram_bins": 40,
    }
    header, body = table(
        [
            student("ce", 0.8, overrides={}, temperature=temperature),
            student("kd", 0.8, overrides={"lr": 0.02, "epochs": 6}, temperature=temperature),
            student("kd_flsw", 0.8, overrides={"arch": "resnet8"}, temperature=temperature),
            student("kd_static", 0.8, dtd="static", overrides={}, temperature=temperature),
        ]
    )
    assert column(header, body, "settings") == {
        "ce": MISSING,
        "kd": "epochs 6, lr 0.02",
        "kd_flsw": "arch resnet8, τ0 4, β 0.5, γ 2",
        "kd_static": "τ0 4, β 0.5",
    }


def test_the_legend_names_the_shared_settings_the_experiments_inherit():
    def record(name, overrides, **resolved):
        config = {"arch": "cnn_tiny", "epochs": 3, "batch_size": 128, "lr": 0.05, "alpha": 0.9, **resolved}
        return student(
            name,
            0.8,
            overrides=overrides,
            config=config,
            temperature={"base_temperature": 4.0, "beta": 1.0, "gamma": 1.0},
        )

    records = [record("kd", {"lr": 0.02}, lr=0.02), record("ce", {})]
    assert shared_settings(records) == {
        "arch": "cnn_tiny",
        "epochs": 3,
        "batch_size": 128,
        "lr": 0.05,
        "alpha": 0.9,
        "base_temperature": 4.0,
        "beta": 1.0,
        "gamma": 1.0,
    }
    text = summary_markdown(
        aggregate_experiments(records), baseline="ce", kd_baseline="kd", shared=shared_settings(records)
    )
    assert (
        "shared student settings: arch cnn_tiny, epochs 3, batch 128, lr 0.05, alpha 0.9, τ0 4, β 1, γ 1"
        in text
    )


def test_a_delta_within_the_larger_seed_std_is_marked_and_the_legend_states_the_rule():
    # kd: 82 ± 1.41 (n = 2); kd_ps: 83 ± 0 (n = 2); kd_far: 86 (n = 1); ce: 80 (n = 1)
    records = [
        student("ce", 0.80),
        student("kd", 0.81),
        student("kd", 0.83, seed=1),
        student("kd_ps", 0.83),
        student("kd_ps", 0.83, seed=1),
        student("kd_far", 0.86),
    ]
    header, body = table(records)
    assert column(header, body, "Δ vs kd") == {
        "ce": "-2.00",
        "kd": "+0.00",
        "kd_ps": "+1.00 ≈",
        "kd_far": "+4.00",
    }
    assert column(header, body, "Δ vs ce") == {
        "ce": "+0.00",
        "kd": "+2.00",
        "kd_ps": "+3.00",
        "kd_far": "+6.00",
    }  # n = 1 for ce, std 0 for kd_ps
    text = summary_markdown(aggregate_experiments(records), baseline="ce", kd_baseline="kd")
    assert (
        "≈ after a Δ: it is within the seed spread (|Δ| ≤ the larger sample std of the two experiments)"
        in text
    )


def test_two_single_seed_experiments_have_no_spread_to_be_within():
    rows = {row.experiment: row for row in aggregate_experiments([student("a", 0.8), student("b", 0.8)])}
    assert not within_spread(rows["a"], rows["b"])


@pytest.mark.parametrize(
    "top1, classes, flagged",
    [
        (0.12, 10, True),
        (0.1201, 10, False),
        (0.015, 100, True),
        (0.016, 100, False),
        (0.52, 2, True),
        (0.60, 2, False),
        (0.27, 4, True),
        (0.28, 4, False),
    ],
)
def test_near_chance_is_at_most_the_lower_of_one_and_a_half_chance_and_chance_plus_two_points(
    top1, classes, flagged
):
    assert near_chance(top1, classes) is flagged


def test_a_teacher_near_chance_is_flagged_in_its_table_and_in_a_warning_line():
    teachers = {
        "weak": {"arch": "mlp", "test_top1": 0.11, "dataset": {"num_classes": 10}},
        "good": {"arch": "mlp", "test_top1": 0.91, "dataset": {"num_classes": 10}},
    }
    header, body = teacher_table(teachers)
    assert column(header, body, "test top-1") == {"good": "91.00", "weak": "11.00 (near chance)"}
    text = summary_markdown(
        aggregate_experiments([student("ce", 0.8)]), baseline="ce", kd_baseline="kd", teachers=teachers
    )
    assert "**Near chance:** weak (test top-1 at most min(1.5/C, 1/C + 2 points)" in text
    assert "good (" not in text


def test_with_a_val_split_the_tables_show_val_and_test_top1_and_the_split_sizes():
    records = [
        student("ce", 0.80, val_top1=0.78),
        student("kd", 0.82, val_top1=0.84),
        student("kd", 0.84, seed=1, val_top1=0.86),
    ]
    header, body = table(records)
    assert header[header.index("val top-1") + 1] == "student top-1"
    assert column(header, body, "val top-1") == {"ce": "78.00", "kd": "85.00 ± 1.41"}
    assert column(header, body, "student top-1") == {"ce": "80.00", "kd": "83.00 ± 1.41"}
    theader, tbody = teacher_table({"t": {"arch": "a", "test_top1": 0.9, "val_top1": 0.88}})
    assert column(theader, tbody, "val top-1") == {"t": "88.00"}
    text = summary_markdown(
        aggregate_experiments(records),
        baseline="ce",
        kd_baseline="kd",
        dataset="npz",
        dataset_info={"name": "npz", "num_classes": 4, "splits": {"test": 64, "train": 192, "val": 64}},
    )
    assert "Dataset: npz (train 192 / val 64 / test 64 images, 4 classes)." in text
    assert "(val top-1: the held-out val split)" in text


def test_without_a_val_split_there_is_no_val_column():
    header, _ = table([student("ce", 0.8), student("kd", 0.82)])
    assert "val top-1" not in header


def test_run_reads_the_config_record_beside_each_metrics_file(tmp_path):
    metrics = tmp_path / "metrics" / "students"
    numbers = {"test_top1": 0.8, "val_top1": 0.75, "test_top5": 0.99, "wall_s": 1.0}
    for name, kd, overrides in (("ce", False, {}), ("kd", True, {"epochs": 2})):
        write_json(metrics / f"{name}-seed0.json", numbers)
        write_json(
            metrics / f"{name}-seed0-config.json",
            {
                "experiment": name,
                "seed": 0,
                "teacher": {"name": "t", "arch": "mlp", "checkpoint_sha256": "0" * 64},
                "config": {
                    "kd": kd,
                    "adjust": "none",
                    "dtd": "off",
                    "fixed_target_temperature": None,
                    "arch": "mlp",
                    "epochs": 1 + len(overrides),
                    "batch_size": 32,
                    "lr": 0.05,
                    "alpha": 0.9,
                },
                "overrides": overrides,
                "temperature": {"base_temperature": 4.0, "beta": 1.0, "gamma": 1.0},
                "dataset": {"name": "npz", "num_classes": 4, "splits": {"train": 192, "val": 64, "test": 64}},
            },
        )
    teacher = write_json(tmp_path / "metrics" / "teachers" / "t.json", {"test_top1": 0.26, "epochs": 1})
    write_json(
        tmp_path / "metrics" / "teachers" / "t-config.json",
        {"teacher": "t", "arch": "mlp", "dataset": {"name": "npz", "num_classes": 4}},
    )
    run(
        CONFIG,
        students=[metrics / "ce-seed0.json", metrics / "kd-seed0.json"],
        teachers=[teacher],
        adjust_metrics=[],
        temperature_metrics=[],
        temperature_histograms=[],
        out_dir=tmp_path / "reports",
    )
    text = (tmp_path / "reports" / "summary.md").read_text()
    assert "Dataset: npz (train 192 / val 64 / test 64 images, 4 classes)." in text
    assert "| t | mlp | 26.00 (near chance) | – | 1 |" in text
    assert (
        "| kd | 1 | t | yes | none | off | 26.00 | 75.00 | 80.00 |" in text
        and text.count("| epochs 2 |") == 1
    )


def test_config_records_go_with_their_runs_and_stray_ones_are_named(tmp_path):
    from stages.report import configured_inputs

    students = tmp_path / "students"
    for stem in ("kd-seed0", "kd-seed0-config", "old-seed0", "old-seed0-config"):
        write_json(students / f"{stem}.json", {})
    teachers = tmp_path / "metrics" / "teachers"
    for stem in ("t", "t-config", "t-curve", "gone", "gone-config"):
        write_json(teachers / f"{stem}.json", {})
    inputs = configured_inputs(
        runs=[("kd", 0)],
        teachers=["t"],
        adjust_methods=[],
        students_dir=students,
        curves_dir=tmp_path / "none",
        metrics_root=tmp_path / "metrics",
        histograms_dir=tmp_path / "none",
    )
    assert inputs["students"] == [students / "kd-seed0.json"] and inputs["teachers"] == [teachers / "t.json"]
    assert [p.name for p in inputs["strays"]] == [
        "gone-config.json",
        "gone.json",
        "old-seed0-config.json",
        "old-seed0.json",
    ]


def test_the_ka_table_shows_the_view_statistics_of_a_store_of_every_view():
    from stages.report import adjust_table

    plain = {"method": "ps", "rewritten_views": 5, "rewritten_fraction": 0.05, "teacher_train_accuracy": 0.95}
    header, body = adjust_table([("t", plain)])
    assert len(header) == 5
    views = {**plain, "top_class_changed_fraction": 0.125, "right_plain_wrong_some_view": 0.25}
    header, body = adjust_table([("t", views), ("u", plain)])
    assert body[0][-2:] == ["12.50", "25.00"] and body[1][-2:] == ["–", "–"]

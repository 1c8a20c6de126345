"""Stage `report`: one summary of every student experiment next to its teacher (DESIGN §7).

*Preparing Lessons: Improve Knowledge Distillation with Better Supervision* (Wen, Lai, Qian;
arXiv:1911.07471) compares plain training (`ce`), plain KD (`kd`) and KD with Knowledge
Adjustment (KA, §3.1) and Dynamic Temperature Distillation (DTD, §3.2). This stage reads the
metrics JSON files the other stages wrote and writes `summary.md` (teacher, KA, DTD and student
tables) with three PNGs beside it: `accuracy.png`, `curves.png`, `temperature.png`.

The pure functions at the top turn metrics dicts into table rows, table text and PNG bytes;
`configured_inputs()` picks the files of the runs params.yaml configures (experiments × seeds,
teachers, KA methods) and names the strays beside them (left on disk, shown in no table or plot);
`run()` at the bottom reads the files (each metrics file with the `<stem>-config.json` record
beside it: names, settings, split sizes), checks them and writes every output atomically. Runs of
one experiment that differ only in seed are aggregated: mean ± sample std (ddof = 1) of top-1
over the n seeds.

Two judgements are printed with their rule: a teacher is *near chance* when its test top-1 is at
most min(1.5/C, 1/C + 0.02) (`near_chance`), and a Δ is *within the seed spread* (marked ≈) when
|Δ| is at most the larger sample std of the two experiments (`within_spread`). PNGs carry no
timestamp or software metadata, so the same inputs give the same bytes (stable DVC hashes).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.atomic import atomic_write_bytes, refuse_foreign_file
from storage.errors import LessonsError

if TYPE_CHECKING:
    from pipeline.config import ReportConfig

logger = logging.getLogger(__name__)


class ReportError(LessonsError, ValueError):
    """A metrics, curve or histogram file the report needs is missing, unreadable or inconsistent."""


#: Shown in a table cell whose value is unknown (no baseline, no teacher, metric not recorded).
MISSING = "–"
SUMMARY_NAME = "summary.md"
ACCURACY_PNG, CURVES_PNG, TEMPERATURE_PNG = "accuracy.png", "curves.png", "temperature.png"
#: Student settings that must agree between runs aggregated under one experiment name.
EXPERIMENT_KEYS = (
    "teacher",
    "kd",
    "adjust",
    "dtd",
    "fixed_target_temperature",
    "teacher_mode",
    "loss",
    "dkd_alpha",
    "dkd_beta",
    "dkd_warmup",
    "arch",
    "epochs",
    "lr",
    "alpha",
)
#: (header, body) of a Markdown table; body cells are display strings.
Table = tuple[list[str], list[list[Any]]]


@dataclass(frozen=True)
class ExperimentRow:
    """One student experiment, aggregated over its seeds. Accuracies are fractions in [0, 1].

    `top1_std` is the sample standard deviation (ddof = 1) over seeds, None when n = 1; the
    optional teacher-side fields are means over the runs that recorded them, None if none did.
    """

    experiment: str
    teacher: str | None
    kd: bool
    adjust: str
    dtd: str
    seeds: tuple[Any, ...]
    top1_mean: float
    top1_std: float | None
    top5_mean: float | None
    teacher_top1: float | None
    agreement_top1: float | None
    mean_kl_teacher: float | None  # KL(teacher ‖ student) at τ = 1, nats
    wall_s: float | None
    val_top1_mean: float | None = None  # over the runs with a val split; None without one
    val_top1_std: float | None = None  # sample std (ddof = 1) when n > 1
    settings: str = ""  # what this experiment sets differently from the shared defaults
    teacher_mode: str = "offline"  # online: the teacher ran on every batch (the baseline of the stores)
    images_per_s: float | None = None  # training images per second, mean over seeds
    kd_label: str = "yes"  # the KD column: "yes" (Hinton's KD) or the logit-KD loss with its weights

    @property
    def n(self) -> int:
        return len(self.seeds)


# --- which files belong to the configured pipeline ---------------------------------------------


def run_stem(experiment: str, seed: int) -> str:
    """`<experiment>-seed<seed>`: the stem dvc.yaml's `student_train` gives a run's metrics and curve."""
    return f"{experiment}-seed{seed}"


CONFIG_SUFFIX = "-config"  # `<stem>-config.json` beside a metrics file: its names and settings


def config_file(metrics_path: str | Path) -> Path:
    """The config record beside a metrics file: `<stem>-config.json`."""
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(f"{metrics_path.stem}{CONFIG_SUFFIX}.json")


def split_by_stem(paths: Iterable[Path], stems: Iterable[str]) -> tuple[list[Path], list[Path]]:
    """(the paths whose file stem is one of `stems`, the others), each in the given order.

    A config record `<stem>-config.json` goes with its metrics file: never kept (it is read
    beside the metrics), a stray when `<stem>` is not wanted."""
    wanted = set(stems)
    kept: list[Path] = []
    strays: list[Path] = []
    for path in paths:
        if path.stem.endswith(CONFIG_SUFFIX) and path.stem[: -len(CONFIG_SUFFIX)] in wanted:
            continue
        (kept if path.stem in wanted else strays).append(path)
    return kept, strays


# --- aggregation and ordering ------------------------------------------------------------------


def _mean_of(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in records if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_format_value, value)) + "]"
    return str(value)


#: How a setting is named in the settings column and the shared line.
SETTING_LABELS = {"batch_size": "batch", "base_temperature": "τ0", "beta": "β", "gamma": "γ"}


def settings_label(record: Mapping[str, Any]) -> str:
    """The settings column of one experiment: every key it overrides (its config record's
    `overrides`, e.g. "epochs 2, lr 0.02"), then, when it uses DTD, the τ0 and β of the
    `temperature` section it ran with (and γ for flsw). "" when there is nothing to show."""
    parts = [
        f"{SETTING_LABELS.get(key, key)} {_format_value(value)}"
        for key, value in sorted((record.get("overrides") or {}).items())
    ]
    temperature = record.get("temperature") or {}
    if record.get("dtd", "off") != "off" and temperature:
        keys = ("base_temperature", "beta") + (("gamma",) if record.get("dtd") == "flsw" else ())
        parts += [
            f"{SETTING_LABELS[key]} {_format_value(temperature[key])}" for key in keys if key in temperature
        ]
    return ", ".join(parts)


def shared_settings(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The shared student settings the experiments inherit: for each key some experiment could
    override (`pipeline.config.OVERRIDABLE`), the resolved value of the runs that do not, plus
    the `temperature` section's τ0, β and γ; keys no run inherits are left out.

    Args:
        records: flat student records (see `student_record`) with `config` and `overrides`.
    """
    shared: dict[str, Any] = {}
    for record in records:
        resolved, overrides = record.get("config") or {}, record.get("overrides") or {}
        for key in ("arch", "epochs", "batch_size", "lr", "alpha"):
            if key in resolved and key not in overrides:
                shared.setdefault(key, resolved[key])
        for key in ("base_temperature", "beta", "gamma"):
            if key in (record.get("temperature") or {}):
                shared.setdefault(key, record["temperature"][key])
    order = ("arch", "epochs", "batch_size", "lr", "alpha", "base_temperature", "beta", "gamma")
    return {key: shared[key] for key in order if key in shared}


def student_record(metrics: Mapping[str, Any], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """One flat record of a student run: its metrics (numbers) and its config record (the
    `<stem>-config.json` student_train writes: experiment, seed, teacher, resolved `config`,
    `overrides`, `temperature`, `data`, `dataset`). Without a config record the metrics dict
    must hold the settings itself (files written before the two were separated)."""
    if config is None:
        return dict(metrics)
    resolved = config.get("config") or {}
    teacher = config.get("teacher")
    return {
        **{
            key: resolved.get(key)
            for key in (
                "kd",
                "adjust",
                "dtd",
                "fixed_target_temperature",
                "arch",
                "epochs",
                "batch_size",
                "lr",
                "alpha",
            )
        },
        "teacher_mode": resolved.get("teacher_mode", "offline"),
        # records written before the `loss` key were kd; DKD's weights only where they are read
        "loss": resolved.get("loss") or "kd",
        **{
            key: resolved.get(key, default) if resolved.get("loss") == "dkd" else None
            for key, default in (("dkd_alpha", None), ("dkd_beta", None), ("dkd_warmup", 0))
        },  # dkd records written before dkd_warmup ran without a warm-up
        "experiment": config.get("experiment"),
        "seed": config.get("seed"),
        "teacher": teacher.get("name") if isinstance(teacher, Mapping) else teacher,
        **{key: config[key] for key in ("config", "overrides", "temperature", "dataset") if key in config},
        **metrics,
    }


def _adjust_label(record: Mapping[str, Any]) -> str:
    """The KA column: the method, and the student's temperature on fixed rows when overridden."""
    label = str(record.get("adjust", "none"))
    if record.get("fixed_target_temperature") not in (None, 1.0):  # 1.0: the default (DESIGN §4)
        label += f" (fixed rows at τ {float(record['fixed_target_temperature']):g})"
    return label


def _loss_label(record: Mapping[str, Any]) -> str:
    """The KD column: "no" for a CE student, "yes" for KD (Hinton), else the loss, e.g. "dkd (α 1, β 8)"."""
    if not record.get("kd", False):
        return "no"
    loss = str(record.get("loss") or "kd")
    if loss == "kd":
        return "yes"
    if loss == "dkd":
        warmup = record.get("dkd_warmup")  # records written before the key had none
        ramp = f", warm-up {_format_value(warmup)} epochs" if warmup else ""
        weights = f"α {_format_value(record.get('dkd_alpha'))}, β {_format_value(record.get('dkd_beta'))}"
        return f"dkd ({weights}{ramp})"
    return loss


def aggregate_experiments(students: Sequence[Mapping[str, Any]]) -> list[ExperimentRow]:
    """Group student metrics dicts by experiment name; mean ± std of top-1 over seeds.

    Args:
        students: metrics dicts as `student_train` writes them (keys `experiment`, `test_top1`
            required; `seed`, `teacher`, `kd`, `adjust`, `dtd`, `test_top5`, `teacher_test_top1`,
            `agreement_top1`, `mean_kl_teacher`, `wall_s`, `val_top1`, `overrides`,
            `temperature` optional; see `student_record`).
    Returns:
        One row per experiment, in first-seen order. top1_mean is the mean over seeds, top1_std
        the sample std (ddof = 1) for n > 1, else None.
    Raises:
        ReportError: two runs of one experiment share a seed, or differ in a setting other than
            the seed (`EXPERIMENT_KEYS`).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in students:
        groups.setdefault(str(record["experiment"]), []).append(record)
    rows = []
    for name, records in groups.items():
        first = records[0]
        seeds = tuple(r.get("seed") for r in records)
        if len(set(map(repr, seeds))) != len(seeds):
            raise ReportError(
                f"experiment {name!r}: several metrics files have the same seed "
                f"({', '.join(map(repr, seeds))}); pass each run once"
            )
        for record in records[1:]:
            for key in EXPERIMENT_KEYS:
                if record.get(key) != first.get(key):
                    raise ReportError(
                        f"experiment {name!r}: runs differ in {key} ({first.get(key)!r} vs "
                        f"{record.get(key)!r}); only the seed may differ, rename one experiment"
                    )
        top1 = [float(r["test_top1"]) for r in records]
        val = [float(r["val_top1"]) for r in records if r.get("val_top1") is not None]
        rows.append(
            ExperimentRow(
                experiment=name,
                teacher=first.get("teacher"),
                kd=bool(first.get("kd", False)),
                adjust=_adjust_label(first),
                dtd=str(first.get("dtd", "off")),
                seeds=seeds,
                top1_mean=statistics.fmean(top1),
                top1_std=statistics.stdev(top1) if len(top1) > 1 else None,
                top5_mean=_mean_of(records, "test_top5"),
                teacher_top1=_mean_of(records, "teacher_test_top1"),
                agreement_top1=_mean_of(records, "agreement_top1"),
                mean_kl_teacher=_mean_of(records, "mean_kl_teacher"),
                wall_s=_mean_of(records, "wall_s"),
                val_top1_mean=statistics.fmean(val) if val else None,
                val_top1_std=statistics.stdev(val) if len(val) > 1 else None,
                settings=settings_label(first),
                teacher_mode=str(first.get("teacher_mode") or "offline"),
                images_per_s=_mean_of(records, "images_per_s"),
                kd_label=_loss_label(first),
            )
        )
    return rows


def online_table(rows: Sequence[ExperimentRow]) -> Table:
    """Offline lessons against online KD: each `teacher_mode: online` experiment beside the
    offline experiment with the same teacher, KA, DTD and settings (DESIGN §5).

    Returns:
        (header, body): method, both experiments, top-1 mean ± std, Δ (points, online − offline),
        wall time and images/s of each. Online experiments without an offline twin are left out.
    """
    header = [
        "teacher",
        "KA",
        "DTD",
        "offline",
        "online",
        "offline top-1",
        "online top-1",
        "Δ",
        "offline s",
        "online s",
        "offline img/s",
        "online img/s",
    ]
    body = []
    for online in (r for r in rows if r.teacher_mode == "online"):
        twin = next(
            (
                r
                for r in rows
                if r.teacher_mode == "offline"
                and r.kd
                and (r.teacher, r.kd_label, r.adjust, r.dtd, r.settings)
                == (online.teacher, online.kd_label, online.adjust, online.dtd, online.settings)
            ),
            None,
        )
        if twin is None:
            continue
        body.append(
            [
                online.teacher,
                online.adjust,
                online.dtd,
                twin.experiment,
                online.experiment,
                format_top1(twin),
                format_top1(online),
                format_delta(online, twin),
                format_number(twin.wall_s, 0),
                format_number(online.wall_s, 0),
                format_number(twin.images_per_s, 0),
                format_number(online.images_per_s, 0),
            ]
        )
    return header, body


def order_rows(rows: Iterable[ExperimentRow], baseline: str, kd_baseline: str) -> list[ExperimentRow]:
    """The baseline first, the KD baseline second, then every other experiment by name."""
    rank = {baseline: 0, kd_baseline: 1}
    return sorted(rows, key=lambda row: (rank.get(row.experiment, 2), row.experiment))


def delta_pp(row: ExperimentRow, reference: ExperimentRow | None) -> float | None:
    """Mean top-1 of `row` minus that of `reference`, in percentage points (None: no reference)."""
    if reference is None:
        return None
    return 100.0 * (row.top1_mean - reference.top1_mean)


def within_spread(row: ExperimentRow, reference: ExperimentRow | None) -> bool:
    """Whether the Δ of `row` against `reference` is within the seed spread: |Δ| <= the larger
    sample std of top-1 of the two (each over its seeds). False when neither has n > 1 (no
    spread known), when there is no reference, or for the reference itself."""
    if reference is None or reference is row or reference.experiment == row.experiment:
        return False
    spreads = [std for std in (row.top1_std, reference.top1_std) if std is not None]
    return bool(spreads) and abs(row.top1_mean - reference.top1_mean) <= max(spreads)


def near_chance(top1: float, num_classes: int) -> bool:
    """A teacher is near chance when its test top-1 is at most min(1.5/C, 1/C + 0.02): within 1.5
    times chance or 2 points above it, whichever is stricter (C = 10: <= 12%; C = 100: <= 1.5%;
    C = 2: <= 52%). Its soft labels then carry little beyond the label."""
    chance = 1.0 / num_classes
    return top1 <= min(1.5 * chance, chance + 0.02)


# --- formatting --------------------------------------------------------------------------------


def format_percent(fraction: float | None, digits: int = 2) -> str:
    """0.871 -> "87.10"; None -> "–"."""
    return MISSING if fraction is None else f"{100.0 * fraction:.{digits}f}"


def format_signed(points: float | None) -> str:
    """2.0 -> "+2.00", -0.5 -> "-0.50", None -> "–"; a value that rounds to zero is "+0.00"."""
    if points is None:
        return MISSING
    text = f"{points:+.2f}"
    return "+0.00" if text == "-0.00" else text


def format_number(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def format_top1(row: ExperimentRow) -> str:
    """Top-1 in %: "82.00" for one seed, "82.00 ± 1.00" (mean ± sample std) for several."""
    return format_mean_std(row.top1_mean, row.top1_std)


def format_mean_std(mean: float | None, std: float | None) -> str:
    """A fraction's mean (and sample std when known) in %: "82.00" or "82.00 ± 1.00"; None -> "–"."""
    if mean is None or std is None:
        return format_percent(mean)
    return f"{format_percent(mean)} ± {format_percent(std)}"


def format_delta(row: ExperimentRow, reference: ExperimentRow | None) -> str:
    """Δ of mean top-1 in points, "≈" appended when it is within the seed spread (`within_spread`)."""
    text = format_signed(delta_pp(row, reference))
    return f"{text} ≈" if within_spread(row, reference) else text


def _cell(value: Any) -> str:
    text = MISSING if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; None cells render as "–", pipes are escaped."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def student_table(
    rows: Sequence[ExperimentRow],
    baseline: str,
    kd_baseline: str,
    teacher_top1: Mapping[str, float] | None = None,
) -> Table:
    """Header and body of the main table, one row per experiment in the given order.

    Args:
        rows: aggregated experiments (see `aggregate_experiments`, `order_rows`).
        baseline / kd_baseline: experiment names the two Δ columns are measured against.
        teacher_top1: teacher name -> test top-1, used where a student did not record it.
    Returns:
        (header, body); a "val top-1" column when any run has a val split; Δ columns in
        percentage points of mean (test) top-1, "–" when the reference experiment is absent, "≈"
        appended when within the seed spread; "settings": what the experiment sets differently
        from the shared defaults (`settings_label`).
    """
    teacher_top1 = teacher_top1 or {}
    by_name = {row.experiment: row for row in rows}
    with_val = any(row.val_top1_mean is not None for row in rows)
    header = [
        "experiment",
        "n",
        "teacher",
        "KD",
        "KA",
        "DTD",
        "teacher top-1",
        *(["val top-1"] if with_val else []),
        "student top-1",
        "top-5",
        f"Δ vs {baseline}",
        f"Δ vs {kd_baseline}",
        "agreement",
        "KL(teacher‖student)",
        "time (s)",
        "settings",
    ]
    body = []
    for row in rows:
        teacher_acc = row.teacher_top1
        if teacher_acc is None and row.teacher is not None:
            teacher_acc = teacher_top1.get(row.teacher)
        body.append(
            [
                row.experiment,
                str(row.n),
                row.teacher or MISSING,
                row.kd_label if row.kd else "no",
                row.adjust,
                row.dtd,
                format_percent(teacher_acc),
                *([format_mean_std(row.val_top1_mean, row.val_top1_std)] if with_val else []),
                format_top1(row),
                format_percent(row.top5_mean),
                format_delta(row, by_name.get(baseline)),
                format_delta(row, by_name.get(kd_baseline)),
                format_percent(row.agreement_top1),
                format_number(row.mean_kl_teacher, 4),
                format_number(row.wall_s, 1),
                row.settings or MISSING,
            ]
        )
    return header, body


def teacher_table(teachers: Mapping[str, Mapping[str, Any]], num_classes: int | None = None) -> Table:
    """Header and body of the teacher table, by teacher name; a "val top-1" column when any
    teacher has one; "(near chance)" after a test top-1 that `near_chance` flags (C from the
    teacher's `dataset` record, else `num_classes`)."""
    with_val = any(m.get("val_top1") is not None for m in teachers.values())
    header = [
        "teacher",
        "arch",
        "test top-1",
        *(["val top-1"] if with_val else []),
        "train top-1",
        "epochs",
        "wall time (s)",
    ]
    body = []
    for name, m in sorted(teachers.items()):
        test = format_percent(m.get("test_top1"))
        classes = (m.get("dataset") or {}).get("num_classes", num_classes)
        if m.get("test_top1") is not None and classes and near_chance(float(m["test_top1"]), int(classes)):
            test += " (near chance)"
        body.append(
            [
                name,
                m.get("arch"),
                test,
                *([format_percent(m.get("val_top1"))] if with_val else []),
                format_percent(m.get("train_top1")),
                m.get("epochs"),
                format_number(m.get("wall_s"), 1),
            ]
        )
    return header, body


def adjust_table(adjust: Sequence[tuple[str, Mapping[str, Any]]]) -> Table:
    """Header and body of the KA table from (teacher, metrics) pairs (arXiv:1911.07471 §3.1)."""
    header = ["teacher", "method", "rewritten views", "% rewritten", "teacher train accuracy"]
    rows = sorted(adjust, key=lambda item: (item[0], str(item[1]["method"])))
    body = [
        [
            teacher,
            m["method"],
            m["rewritten_views"],
            format_percent(m["rewritten_fraction"]),
            format_percent(m.get("teacher_train_accuracy")),
        ]
        for teacher, m in rows
    ]
    if any("top_class_changed_fraction" in m for _, m in rows):  # a store of every view (views: all)
        header += [
            "% views whose top class differs from the plain image's",
            "% images right on the plain image, wrong on some view",
        ]
        for cells, (_, m) in zip(body, rows, strict=True):
            cells += [
                format_percent(m.get("top_class_changed_fraction")),
                format_percent(m.get("right_plain_wrong_some_view")),
            ]
    return header, body


def temperature_lines(temperature: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One Markdown bullet per teacher: static τ^T mean ± std and p5 / p50 / p95 (§3.2)."""
    return [
        f"- {name}: static τ = {m['static_temperature_mean']:.3f} ± "
        f"{m['static_temperature_std']:.3f}; p5 / p50 / p95 = "
        f"{m['static_temperature_p05']:.3f} / {m['static_temperature_p50']:.3f} / "
        f"{m['static_temperature_p95']:.3f}"
        for name, m in sorted(temperature.items())
    ]


def summary_markdown(
    rows: Sequence[ExperimentRow],
    *,
    baseline: str,
    kd_baseline: str,
    teachers: Mapping[str, Mapping[str, Any]] | None = None,
    adjust: Sequence[tuple[str, Mapping[str, Any]]] = (),
    temperature: Mapping[str, Mapping[str, Any]] | None = None,
    dataset: str | None = None,
    strays: Sequence[str | Path] = (),
    dataset_info: Mapping[str, Any] | None = None,
    shared: Mapping[str, Any] | None = None,
    params_name: str = "params.yaml",
) -> str:
    """The whole `summary.md` text; sections without input are left out. `strays`: files of
    runs or teachers that params.yaml does not configure, named in one line (shown nowhere else).
    `dataset_info`: {"name", "num_classes", "splits": {split: size}} (a run's `dataset` record),
    shown as the split sizes and used for the near-chance rule. `shared`: the shared student
    settings (`shared_settings`), named in the student table's legend. `params_name`: the params
    file's name, as the strays line names it."""
    teachers, temperature = teachers or {}, temperature or {}
    parts = ["# Lessons report: knowledge distillation with KA and DTD (arXiv:1911.07471)"]
    if dataset_info and dataset_info.get("splits"):
        order = {"train": 0, "val": 1, "test": 2}
        sizes = " / ".join(
            f"{split} {count}"
            for split, count in sorted(
                dataset_info["splits"].items(), key=lambda item: (order.get(item[0], 3), item[0])
            )
        )
        name = dataset or dataset_info.get("name")
        parts.append(
            f"Dataset: {name} ({sizes} images, {dataset_info.get('num_classes')} classes)."
            if name
            else f"Dataset: {sizes} images."
        )
    elif dataset:
        parts.append(f"Dataset: {dataset}.")
    if strays:
        parts.append(
            f"Not shown, as {params_name} does not configure them (left on disk): "
            f"{', '.join(f'`{path}`' for path in strays)}."
        )
    if teachers:
        classes = (dataset_info or {}).get("num_classes")
        parts += ["## Teachers", markdown_table(*teacher_table(teachers, classes))]
        flagged = []
        for name, m in sorted(teachers.items()):
            num_classes = (m.get("dataset") or {}).get("num_classes", classes)
            if (
                m.get("test_top1") is not None
                and num_classes
                and near_chance(float(m["test_top1"]), int(num_classes))
            ):
                flagged.append(name)
        if flagged:
            parts.append(
                f"**Near chance:** {', '.join(flagged)} (test top-1 at most min(1.5/C, 1/C + 2 points), "
                "C classes): its soft labels carry little beyond the label, so its students "
                "test little of KD; train it longer or give a stronger checkpoint."
            )
    if adjust:
        parts += ["## Knowledge Adjustment (KA, §3.1)", markdown_table(*adjust_table(adjust))]
    if temperature:
        parts += [
            "## Dynamic Temperature Distillation (DTD, §3.2)",
            "Teacher-only static temperature τ^T over all training views:\n\n"
            + "\n".join(temperature_lines(temperature)),
        ]
    teacher_top1 = {name: m["test_top1"] for name, m in teachers.items() if "test_top1" in m}
    shared = dict(shared or {})
    with_val = any(row.val_top1_mean is not None for row in rows)
    parts += [
        "## Students",
        f"Accuracies in %, test split{' (val top-1: the held-out val split)' if with_val else ''}. "
        "n: seeds; with n > 1, student top-1 is mean ± sample std "
        "over seeds and the other columns are means. Δ: difference of mean top-1 in percentage "
        f"points against `{baseline}` and `{kd_baseline}` ({MISSING}: that experiment is absent); "
        "≈ after a Δ: it is within the seed spread (|Δ| ≤ the larger sample std of the two "
        "experiments), so not a measured difference. "
        "Agreement: top-1 agreement with the teacher; KL(teacher‖student) in nats at τ = 1. "
        "Settings: what an experiment sets itself over the shared student settings"
        + (
            ": "
            + ", ".join(
                f"{SETTING_LABELS.get(key, key)} {_format_value(value)}" for key, value in shared.items()
            )
            if shared
            else ""
        )
        + " (τ0, β of the temperature section shown for DTD experiments).",
        markdown_table(*student_table(rows, baseline, kd_baseline, teacher_top1)),
    ]
    online = online_table(rows)
    if online[1]:
        parts += [
            "## Offline lessons vs online KD",
            "Each `teacher_mode: online` experiment (the teacher run on every batch the student sees) "
            "beside its offline twin (same teacher, KA, DTD and settings, lessons read from the stores). "
            "With `teacher_dump.views: all` or `scheduled` both see the same views and targets, so Δ "
            "should be rounding noise; with `none` the offline student learns from the plain image only. "
            "Δ in points, online − offline; wall time in seconds per run (training and evaluation).",
            markdown_table(*online),
        ]
    parts += [
        "## Plots",
        f"![Student top-1 per experiment]({ACCURACY_PNG})\n\n"
        f"![Student test top-1 per epoch]({CURVES_PNG})\n\n"
        f"![DTD static temperature distribution]({TEMPERATURE_PNG})",
    ]
    return "\n\n".join(parts) + "\n"


# --- plots (PNG bytes, Agg, no metadata) -------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # Agg without pyplot: no global state, no GUI backend
    return fig


def _png_bytes(fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def accuracy_png(rows: Sequence[ExperimentRow], teacher_top1: Mapping[str, float]) -> bytes:
    """Bar chart of mean student top-1 (%) per experiment, sample-std error bars where n > 1,
    and a dashed line at each teacher's test top-1 (`teacher_top1`: name -> fraction)."""
    fig = _figure(max(5.0, 0.9 * len(rows) + 2.0), 4.0)
    ax = fig.add_subplot()
    heights = [100.0 * row.top1_mean for row in rows]
    errors = [100.0 * (row.top1_std or 0.0) for row in rows]
    positions = list(range(len(rows)))
    ax.bar(positions, heights, color="tab:blue")
    spread = [(x, h, e) for x, h, e, row in zip(positions, heights, errors, rows, strict=True) if row.n > 1]
    if spread:
        ax.errorbar(
            [x for x, _, _ in spread],
            [h for _, h, _ in spread],
            yerr=[e for _, _, e in spread],
            fmt="none",
            ecolor="black",
            capsize=4,
        )
    for x, height, error, row in zip(positions, heights, errors, rows, strict=True):
        ax.annotate(
            f"{height:.2f}" + (f"\nn={row.n}" if row.n > 1 else ""),
            (x, height + error),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=7,
        )
    references = sorted(
        {row.teacher for row in rows if row.teacher is not None and row.teacher in teacher_top1}
    )
    for k, name in enumerate(references):
        level = 100.0 * teacher_top1[name]
        ax.axhline(level, linestyle="--", color=f"C{(k + 1) % 10}", label=f"teacher {name} ({level:.2f})")
    levels = heights + [100.0 * teacher_top1[name] for name in references]
    low = min(h - e for h, e in zip(heights, errors, strict=True)) if heights else 0.0
    high = max((h + e for h, e in zip(heights, errors, strict=True)), default=100.0)
    ax.set_ylim(max(0.0, min([low, *levels]) - 5.0), min(100.0, max([high, *levels]) + 3.0))
    ax.set_xticks(positions, [row.experiment for row in rows], rotation=30, ha="right")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Student top-1 per experiment")
    if references:
        ax.legend(loc="lower right", fontsize=8)
    return _png_bytes(fig)


def curves_png(curves: Mapping[str, Sequence[tuple[float, float]]]) -> bytes:
    """Test top-1 (%) per epoch, one line per experiment (`curves`: name -> [(epoch, top1)])."""
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [100.0 * p[1] for p in points], marker="o", markersize=3, label=name)
    if curves:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training curves given", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%) (mean over seeds)")
    ax.set_title("Student test top-1 per epoch")
    return _png_bytes(fig)


def temperature_png(histograms: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """One bar chart per teacher of the static temperature histogram (bin centre, count)."""
    names = sorted(histograms)
    fig = _figure(max(5.0, 4.5 * len(names)), 3.5)
    if not names:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no temperature histogram given", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for k, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        centers = [float(b["temperature"]) for b in histograms[name]]
        width = min((b - a for a, b in itertools.pairwise(centers)), default=0.1)
        ax.bar(centers, [b["count"] for b in histograms[name]], width=0.9 * width)
        ax.set_xlabel("static temperature τ^T")
        ax.set_ylabel("views")
        ax.set_title(f"DTD static temperature: {name}")
    return _png_bytes(fig)


def mean_curve(curves: Sequence[Sequence[Mapping[str, Any]]]) -> list[tuple[float, float]]:
    """Mean test top-1 per epoch over the seeds' curves (each epoch over the curves that have it)."""
    by_epoch: dict[float, list[float]] = {}
    for curve in curves:
        for point in curve:
            by_epoch.setdefault(point["epoch"], []).append(float(point["test_top1"]))
    return [(epoch, statistics.fmean(values)) for epoch, values in sorted(by_epoch.items())]


# --- reading -----------------------------------------------------------------------------------


def read_json(path: str | Path) -> Any:
    """Parse one JSON file. Raises ReportError naming the file when it is missing or not JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: file not found; run the stage that writes it first") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a JSON file (not UTF-8 text)") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _read_dict(path: str | Path, required: Sequence[str]) -> dict[str, Any]:
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in required if key not in obj]
    if missing:
        raise ReportError(f"{path}: missing key(s) {', '.join(missing)}")
    for key in required:
        if key.endswith(("top1", "_mean", "_std", "_p05", "_p50", "_p95", "fraction")) and (
            isinstance(obj[key], bool) or not isinstance(obj[key], (int, float))
        ):
            raise ReportError(f"{path}: {key} must be a number, got {obj[key]!r}")
    return obj


def _read_record(
    path: Path, required: Sequence[str], merge: Any = lambda metrics, config: {**(config or {}), **metrics}
) -> dict[str, Any]:
    """A metrics file merged with the config record beside it (`config_file`), when there is one;
    `required` keys are checked on the merged record (numbers where `_read_dict` wants them)."""
    metrics = _read_dict(path, ())
    record_path = config_file(path)
    config = _read_dict(record_path, ()) if record_path.is_file() else None
    merged = merge(metrics, config)
    missing = [key for key in required if key not in merged]
    if missing:
        beside = "" if config is not None else f" (and there is no {record_path.name} beside it)"
        raise ReportError(f"{path}: missing key(s) {', '.join(missing)}{beside}")
    for key in required:
        if key.endswith(("top1", "fraction")) and (
            isinstance(merged[key], bool) or not isinstance(merged[key], (int, float))
        ):
            raise ReportError(f"{path}: {key} must be a number, got {merged[key]!r}")
    return merged


def _read_list(path: str | Path, required: Sequence[str]) -> list[dict[str, Any]]:
    obj = read_json(path)
    if not isinstance(obj, list) or not all(isinstance(item, dict) for item in obj):
        raise ReportError(f"{path}: expected a JSON list of objects")
    for item in obj:
        missing = [key for key in required if key not in item]
        if missing:
            raise ReportError(f"{path}: an entry lacks key(s) {', '.join(missing)}")
    return obj


def _json_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.json"))


def configured_inputs(
    *,
    runs: Sequence[tuple[str, int]],
    teachers: Sequence[str],
    adjust_methods: Sequence[str],
    students_dir: str | Path,
    curves_dir: str | Path,
    metrics_root: str | Path,
    histograms_dir: str | Path,
) -> dict[str, list[Path]]:
    """The input files of `run` for the pipeline params.yaml configures, and the strays.

    A stray is a `*.json` file the report would read that belongs to no configured run, teacher
    or KA method (an experiment, seed or teacher since removed from params.yaml): it is listed
    under `strays`, never deleted and never read.

    Args:
        runs: the configured (experiment, seed) pairs (`StudentTrainConfig.runs()`).
        teachers: the configured teacher names. adjust_methods: the configured KA methods.
        students_dir / curves_dir: `metrics/students`, `plots/students` (`<run_stem>.json`).
        metrics_root: holds `teachers/<T>.json`, `adjust/<T>-<M>.json`, `temperature/<T>.json`.
        histograms_dir: `plots/temperature/<T>.json`.
    Returns:
        Keyword arguments of `run`: `students` (one file per run, in `runs` order), `curves`,
        `teachers`, `adjust_metrics`, `temperature_metrics`, `temperature_histograms` (the
        configured files that exist) and `strays` (sorted).
    Raises:
        ReportError: a configured run has no metrics file (one line naming the run and the file).
    """
    stems = [run_stem(experiment, seed) for experiment, seed in runs]
    students_dir, metrics_root = Path(students_dir), Path(metrics_root)
    students, stray_students = split_by_stem(_json_files(students_dir), stems)
    curves, stray_curves = split_by_stem(_json_files(curves_dir), stems)
    found = {path.stem for path in students}
    missing = [
        (experiment, seed) for (experiment, seed), stem in zip(runs, stems, strict=True) if stem not in found
    ]
    if missing:
        shown = "; ".join(
            f"{students_dir / (run_stem(e, s) + '.json')}: file not found (experiment {e!r}, seed {s})"
            for e, s in missing[:3]
        )
        more = f"; and {len(missing) - 3} more configured run(s)" if len(missing) > 3 else ""
        raise ReportError(f"{shown}{more}; run the stage that writes it first (`dvc repro`)")
    teacher_files = [
        p
        for p in _json_files(metrics_root / "teachers")
        if not p.stem.endswith(("-curve", f"-curve{CONFIG_SUFFIX}"))
    ]
    inputs = {"students": [students_dir / f"{stem}.json" for stem in stems], "curves": curves}
    strays = stray_students + stray_curves
    for key, paths, wanted in (
        ("teachers", teacher_files, teachers),
        (
            "adjust_metrics",
            _json_files(metrics_root / "adjust"),
            [f"{teacher}-{method}" for teacher in teachers for method in adjust_methods],
        ),
        ("temperature_metrics", _json_files(metrics_root / "temperature"), teachers),
        ("temperature_histograms", _json_files(histograms_dir), teachers),
    ):
        inputs[key], left_out = split_by_stem(paths, wanted)
        strays += left_out
    inputs["strays"] = sorted(strays)
    return inputs


def _adjust_teacher(path: Path, method: str) -> str:
    """`<teacher>-<method>.json` -> teacher (the whole stem if it does not end in -<method>)."""
    suffix = f"-{method}"
    return path.stem[: -len(suffix)] if path.stem.endswith(suffix) else path.stem


# --- stage -------------------------------------------------------------------------------------


def run(
    config: ReportConfig,
    *,
    students: Sequence[str | Path],
    teachers: Sequence[str | Path],
    adjust_metrics: Sequence[str | Path],
    temperature_metrics: Sequence[str | Path],
    temperature_histograms: Sequence[str | Path],
    out_dir: str | Path,
    curves: Sequence[str | Path] = (),
    dataset: str | None = None,
    strays: Sequence[str | Path] = (),
    params_name: str = "params.yaml",
) -> Path:
    """Write `summary.md`, `accuracy.png`, `curves.png` and `temperature.png` into `out_dir`.

    Args:
        config: ReportConfig, or anything with `baseline` and `kd_baseline` (experiment names).
        students: `metrics/students/<name>.json` files, each with its `<name>-config.json`
            record beside it (see `student_record`); several runs of one experiment that differ
            only in seed are aggregated (mean ± sample std of top-1, n).
        teachers: `metrics/teachers/<teacher>.json` files (and their `-config.json` records).
        adjust_metrics: `metrics/adjust/<teacher>-<method>.json` files (and their records).
        temperature_metrics: `metrics/temperature/<teacher>.json` files.
        temperature_histograms: `plots/temperature/<teacher>.json` files.
        out_dir: output folder, created if absent (e.g. `reports/`).
        curves: `plots/students/<name>.json` files; a curve belongs to the student metrics file
            with the same stem, else to the experiment of that name.
        dataset: dataset name for the summary; default: a `dataset` key of any metrics file.
        strays: files left out because params.yaml does not configure them (see
            `configured_inputs`): a warning, and one line of the summary names them.
        params_name: the params file's name, as the warning and the summary name it.
    Returns:
        The path of `summary.md` (written last, after the PNGs).
    Raises:
        ReportError: no student metrics; a file missing, not JSON, or lacking a required key;
            inconsistent runs of one experiment (see `aggregate_experiments`).
        OutputError: `out_dir` is not writable, or an output path holds a link, a folder or a
            file lessons did not write (checked before anything is read).
    """
    if not students:
        raise ReportError("report: no student metrics given; run `lessons student-train` first")
    out_dir = Path(out_dir)
    for name in (ACCURACY_PNG, CURVES_PNG, TEMPERATURE_PNG, SUMMARY_NAME):
        refuse_foreign_file(out_dir / name)  # nothing is created before the inputs are checked
    student_paths = [Path(p) for p in students]
    records = [_read_record(p, ("experiment", "test_top1"), student_record) for p in student_paths]
    teacher_metrics = {}
    for path in map(Path, teachers):
        metrics = _read_record(path, ("test_top1",))
        teacher_metrics[str(metrics.get("teacher") or path.stem)] = metrics
    adjust = []
    for path in map(Path, adjust_metrics):
        metrics = _read_record(path, ("method", "rewritten_views", "rewritten_fraction"))
        adjust.append((_adjust_teacher(path, str(metrics["method"])), metrics))
    temperature = {
        Path(p).stem: _read_dict(
            p, tuple(f"static_temperature_{s}" for s in ("mean", "std", "p05", "p50", "p95"))
        )
        for p in temperature_metrics
    }
    histograms = {Path(p).stem: _read_list(p, ("temperature", "count")) for p in temperature_histograms}

    rows = order_rows(aggregate_experiments(records), config.baseline, config.kd_baseline)
    if strays:
        logger.warning(
            "report: %d file(s) of experiments, seeds or teachers that %s does not "
            "configure are left out of every table and plot (not deleted): %s",
            len(strays),
            params_name,
            ", ".join(map(str, strays)),
        )
    known = {row.experiment for row in rows}
    for key, name in (("baseline", config.baseline), ("kd_baseline", config.kd_baseline)):
        if name not in known:
            logger.warning(
                "report.%s is %r, which is not among the experiments (%s): its Δ column will be empty",
                key,
                name,
                ", ".join(row.experiment for row in rows),
            )
    experiment_of_stem = {
        path.stem: str(r["experiment"]) for path, r in zip(student_paths, records, strict=True)
    }
    curves_by_experiment: dict[str, list[list[dict[str, Any]]]] = {}
    for path in map(Path, curves):
        curve = _read_list(path, ("epoch", "test_top1"))
        name = experiment_of_stem.get(path.stem, path.stem)
        if name not in known:
            logger.warning("%s: no student metrics for experiment %r; curve left out", path, name)
            continue
        curves_by_experiment.setdefault(name, []).append(curve)
    if dataset is None:
        dataset = next(
            (
                str(m["dataset"]["name"] if isinstance(m["dataset"], Mapping) else m["dataset"])
                for m in [*records, *teacher_metrics.values()]
                if m.get("dataset")
            ),
            None,
        )

    teacher_top1 = {name: float(m["test_top1"]) for name, m in teacher_metrics.items()}
    for row in rows:  # a student's own record of its teacher, where no teacher file was given
        if row.teacher is not None and row.teacher_top1 is not None:
            teacher_top1.setdefault(row.teacher, row.teacher_top1)
    ordered_curves = {
        row.experiment: mean_curve(curves_by_experiment[row.experiment])
        for row in rows
        if row.experiment in curves_by_experiment
    }
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / ACCURACY_PNG, accuracy_png(rows, teacher_top1))
    atomic_write_bytes(out_dir / CURVES_PNG, curves_png(ordered_curves))
    atomic_write_bytes(out_dir / TEMPERATURE_PNG, temperature_png(histograms))
    dataset_info = next(
        (
            m["dataset"]
            for m in [*records, *teacher_metrics.values()]
            if isinstance(m.get("dataset"), Mapping)
        ),
        None,
    )
    summary = summary_markdown(
        rows,
        baseline=config.baseline,
        kd_baseline=config.kd_baseline,
        teachers=teacher_metrics,
        adjust=adjust,
        temperature=temperature,
        dataset=dataset,
        strays=strays,
        dataset_info=dataset_info,
        shared=shared_settings(records),
        params_name=params_name,
    )
    summary_path = out_dir / SUMMARY_NAME
    atomic_write_bytes(summary_path, summary.encode("utf-8"))
    logger.info("report: %d experiments (%d runs) -> %s", len(rows), len(records), summary_path)
    return summary_path

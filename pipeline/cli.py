"""`lessons <stage>`: one click command per pipeline stage (also `python -m pipeline <stage>`).

Commands are thin: parse paths, load the typed config from `params.yaml`, call the stage's
`run`. Hyper-parameters come only from `params.yaml`; options carry paths. Deliberate errors
(`storage.errors.LessonsError`) reach the user as one line and exit status 1 (`-v` shows the
traceback); any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.config import AdjustMethod, ConfigError, Params, load_params
from pipeline.launch import RANK_ERRORS, launch, report_rank_error
from pipeline.log import configure_logging
from storage.atomic import OutputError
from storage.errors import LessonsError

logger = logging.getLogger("lessons")


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a deliberate error (`LessonsError`) into a one-line `Error: ...` and exit status 1
    (traceback with -v). Any other exception is a bug in lessons and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return command(*args, **kwargs)
        except LessonsError as exc:
            if ctx.obj.get("verbose"):
                raise
            message = " ".join(str(exc.strerror if isinstance(exc, OutputError) else exc).split())
            if report_rank_error(message):  # a rank of `pipeline.launch`: it prints the line
                ctx.exit(1)
            raise click.ClickException(message) from exc

    return wrapper


def _params(ctx: click.Context) -> Params:
    if "params" not in ctx.obj:
        ctx.obj["params"] = load_params(ctx.obj["params_path"])
    return ctx.obj["params"]


def _device(name: str) -> Any:
    from pipeline.seeding import resolve_device

    try:
        return resolve_device(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _ready_torch() -> None:
    """Import ffcv first (it resets torch's threads), then give torch every core (a torchrun
    rank: its share of them)."""
    import ffcv  # noqa: F401
    import torch

    from stages.distributed import ranks_from_env

    torch.set_num_threads(ranks_from_env().threads())


def _relaunch(
    ctx: click.Context,
    nproc: int,
    device: Any,
    *,
    key: str,
    what: str,
    kept: str | None = None,
    **options: Any,
) -> bool:
    """Run this command as `nproc` torchrun ranks when `nproc` > 1 and this process is not a
    rank yet (`pipeline.launch`). Returns whether it did (the command is then finished)."""
    from stages.distributed import ranks_from_env

    if nproc <= 1 or ranks_from_env().distributed:
        return False
    argv = ["--params", ctx.obj["params_path"], *(["-v"] if ctx.obj.get("verbose") else [])]
    argv.append(ctx.info_name or "")
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    launch(nproc, argv, device=device, key=key, what=what, **({} if kept is None else {"kept": kept}))
    return True


class _UsageError(click.ClickException):
    """A command-line usage error shown as one `Error:` line (exit status 2, as click's own)."""

    exit_code = 2


def _one_line(exc: click.UsageError, ctx: click.Context) -> _UsageError:
    return _UsageError(f"{exc.format_message()} (`{ctx.command_path} --help` lists the options)")


class _Command(click.Command):
    """A command whose usage errors (bad option value, missing option) are one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _one_line(exc, ctx) from exc


class _Group(click.Group):
    """The `lessons` group: its commands are `_Command`s; an unknown command is one line too."""

    command_class = _Command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:  # bare `lessons`: click shows the help
            raise
        except click.UsageError as exc:
            raise _one_line(exc, ctx) from exc

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            raise _one_line(exc, ctx) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--params",
    "params_path",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The parameters file.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
@click.pass_context
def main(ctx: click.Context, params_path: str, verbose: bool) -> None:
    """lessons: offline soft labels for knowledge distillation (arXiv:1911.07471).

    Stages, in pipeline order: prepare-data, teacher-train, teacher-dump, adjust, temperature,
    store-digests, student-train, report. `dvc repro` runs them all from dvc.yaml.
    """
    configure_logging(verbose)
    ctx.ensure_object(dict)
    ctx.obj.update(params_path=params_path, verbose=verbose)


@main.command("prepare-data")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Dataset folder to write (e.g. data/fashion_mnist).",
)
@click.pass_context
@friendly
def prepare_data_command(ctx: click.Context, out_dir: str) -> None:
    """Load the dataset of params `data` and write its betons and manifest."""
    from pipeline.datasets import load_dataset
    from stages import prepare_data

    params = _params(ctx)
    dataset = load_dataset(params.data)
    manifest = prepare_data.run(params.prepare_data, dataset, params.data, out_dir)
    sizes = " / ".join(
        f"{manifest['splits'][split]['num_samples']} {split}"
        for split in ("train", "val", "test")
        if split in manifest["splits"]
    )
    click.echo(f"{out_dir}: {sizes} images of {manifest['dataset']}")


@main.command("teacher-train")
@click.option("--teacher", required=True, help="Name of the teacher in teacher_train.teachers.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option("--checkpoint-out", required=True, type=click.Path(dir_okay=False))
@click.option("--metrics-out", required=True, type=click.Path(dir_okay=False))
@click.option("--curve-out", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Continue an interrupted run of the same teacher from its last epoch.",
)
@click.pass_context
@friendly
def teacher_train_command(
    ctx: click.Context,
    teacher: str,
    data_dir: str,
    checkpoint_out: str,
    metrics_out: str,
    curve_out: str,
    resume: bool,
) -> None:
    """Train a teacher with cross-entropy (or load the checkpoint params.yaml names)."""
    _ready_torch()
    from stages import teacher_train

    config = _params(ctx).teacher_train.teacher(teacher)
    metrics = teacher_train.run(
        config,
        name=teacher,
        data_dir=data_dir,
        checkpoint_out=checkpoint_out,
        metrics_out=metrics_out,
        curve_out=curve_out,
        device=_device(config.device),
        resume=resume,
        data_config=_params(ctx).data,
    )
    click.echo(f"teacher {teacher}: test top-1 {metrics['test_top1']:.4f} -> {checkpoint_out}")


@main.command("teacher-dump")
@click.option("--teacher", required=True, help="Name of the teacher (recorded in the store).")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--out", "train_out", required=True, type=click.Path(), help="Train-split store.")
@click.option("--test-out", required=True, type=click.Path(), help="Test-split store.")
@click.pass_context
@friendly
def teacher_dump_command(
    ctx: click.Context, teacher: str, data_dir: str, checkpoint: str, train_out: str, test_out: str
) -> None:
    """Run the teacher once and write its logits to zarr stores (resumes an interrupted dump)."""
    _ready_torch()
    from stages import teacher_dump
    from stages.distributed import ranks_from_env

    config = _params(ctx).teacher_dump
    device = _device(config.device)
    options = dict(teacher=teacher, data=data_dir, checkpoint=checkpoint, out=train_out, test_out=test_out)
    if config.nproc > 1 and not ranks_from_env().distributed:
        from pipeline.launch import check_nproc
        from storage.atomic import exclusive_lock

        check_nproc(config.nproc, device, key="teacher_dump.nproc")  # before any lock file is made
        for out in (train_out, test_out):  # another job writing them: refused before ranks start
            with exclusive_lock(out):
                pass
    if _relaunch(ctx, config.nproc, device, key="teacher_dump.nproc", what=train_out, **options):
        click.echo(f"teacher {teacher}: logits in {train_out} and {test_out} ({config.nproc} processes)")
        return
    report = teacher_dump.run(
        config,
        teacher=teacher,
        data_dir=data_dir,
        checkpoint=checkpoint,
        train_out=train_out,
        test_out=test_out,
        device=device,
    )
    ranks = ranks_from_env()
    if not ranks.main or os.environ.get(RANK_ERRORS):  # the launching process prints the line
        return
    shared = f", {ranks.world_size} processes" if ranks.distributed else ""
    click.echo(
        f"teacher {teacher}: logits in {train_out} and {test_out} "
        f"({report['images_per_s']:.0f} img/s{shared})"
    )


@main.command("adjust")
@click.option(
    "--method",
    required=True,
    type=click.Choice(["ps", "lsr", "none"]),
    help="Knowledge Adjustment method (a matrix item of adjust.methods).",
)
@click.option("--logits", "logits_path", required=True, type=click.Path(), help="Teacher logit store.")
@click.option("--out", required=True, type=click.Path(), help="Adjusted store to write.")
@click.option("--metrics-out", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--scheduler",
    default=None,
    help="dask.distributed scheduler address (default: the section's `scheduler`, else local threads).",
)
@click.pass_context
@friendly
def adjust_command(
    ctx: click.Context,
    method: AdjustMethod,
    logits_path: str,
    out: str,
    metrics_out: str,
    scheduler: str | None,
) -> None:
    """Knowledge Adjustment: rewrite the teacher targets that are wrong (PS or LSR)."""
    from stages import adjust

    summary = adjust.run(
        _params(ctx).adjust,
        method=method,
        logits_path=logits_path,
        out=out,
        metrics_out=metrics_out,
        scheduler=scheduler,
    )
    click.echo(
        f"{out}: {method} rewrote {summary['rewritten_views']} views "
        f"({100 * summary['rewritten_fraction']:.2f}%)"
    )


@main.command("temperature")
@click.option("--logits", "logits_path", required=True, type=click.Path(), help="Teacher logit store.")
@click.option("--out", required=True, type=click.Path(), help="DTD store to write (stores/T/dtd.zarr).")
@click.option("--metrics-out", required=True, type=click.Path(dir_okay=False))
@click.option("--histogram-out", required=True, type=click.Path(dir_okay=False))
@click.option("--plot-out", default=None, type=click.Path(dir_okay=False), help="PNG histogram.")
@click.option(
    "--scheduler",
    default=None,
    help="dask.distributed scheduler address (default: the section's `scheduler`, else local threads).",
)
@click.pass_context
@friendly
def temperature_command(
    ctx: click.Context,
    logits_path: str,
    out: str,
    metrics_out: str,
    histogram_out: str,
    plot_out: str | None,
    scheduler: str | None,
) -> None:
    """Dynamic Temperature Distillation: precompute teacher-side per-sample statistics."""
    from stages import temperature

    summary = temperature.run(
        _params(ctx).temperature,
        logits_path=logits_path,
        out=out,
        metrics_out=metrics_out,
        histogram_out=histogram_out,
        plot_out=plot_out,
        scheduler=scheduler,
    )
    click.echo(
        f"{out}: static temperature mean {summary['static_temperature_mean']:.3f} "
        f"(p5 {summary['static_temperature_p05']:.3f}, p95 {summary['static_temperature_p95']:.3f})"
    )


@main.command("ensemble")
@click.option("--ensemble", "name", required=True, help="Name in ensemble.ensembles.")
@click.option(
    "--stores",
    "stores_root",
    default="stores",
    show_default=True,
    type=click.Path(),
    help="Folder holding one store folder per teacher; writes <stores>/<ensemble>/.",
)
@click.option(
    "--scheduler", default=None, help="dask.distributed scheduler address (default: local threads)."
)
@click.pass_context
@friendly
def ensemble_command(ctx: click.Context, name: str, stores_root: str, scheduler: str | None) -> None:
    """Teacher ensemble: combine the members' logit stores (train and test) into one teacher."""
    from stages import ensemble

    params = _params(ctx)
    params.check_ensembles()
    summaries = ensemble.run(params.ensemble, name=name, stores_root=stores_root, scheduler=scheduler)
    for file, summary in summaries.items():
        members = ", ".join(f"{k} {v:.4f}" for k, v in summary["member_top1"].items())
        click.echo(
            f"{Path(stores_root) / name / file}: top-1 {summary['ensemble_top1']:.4f} (members {members})"
        )


@main.command("student-train")
@click.option("--experiment", required=True, help="Name in student_train.experiments.")
@click.option(
    "--seed", type=int, default=None, help="One of student_train.seeds (a matrix item; default: the first)."
)
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option(
    "--stores",
    "stores_root",
    default="stores",
    show_default=True,
    type=click.Path(),
    help="Folder holding one store folder per teacher.",
)
@click.option("--checkpoint-out", required=True, type=click.Path(dir_okay=False))
@click.option("--metrics-out", required=True, type=click.Path(dir_okay=False))
@click.option("--curve-out", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Continue an interrupted run of the same experiment from its last epoch.",
)
@click.option(
    "--teacher-checkpoints",
    default="checkpoints/teachers",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder of <teacher>.pt checkpoints, read by teacher_mode: online experiments only.",
)
@click.pass_context
@friendly
def student_train_command(
    ctx: click.Context,
    experiment: str,
    seed: int | None,
    data_dir: str,
    stores_root: str,
    checkpoint_out: str,
    metrics_out: str,
    curve_out: str,
    resume: bool,
    teacher_checkpoints: str,
) -> None:
    """Train a student from the precomputed lessons (KD + KA + DTD), or with plain CE."""
    _ready_torch()
    from stages import student_train
    from stages.distributed import ranks_from_env

    params = _params(ctx)
    if seed is not None and seed not in params.student_train.seeds:
        raise ConfigError(f"--seed {seed}: not in student_train.seeds {list(params.student_train.seeds)}")
    resolved = params.student_train.experiment(experiment, seed)
    if resolved.teacher is not None and resolved.teacher not in params.teacher_names():
        raise ConfigError(
            f"student_train.experiments.{experiment}.teacher: no teacher named "
            f"{resolved.teacher!r}; known: {sorted(params.teacher_names())} (teacher_train.teachers "
            "and ensemble.ensembles)"
        )
    device = _device(resolved.device)
    options = dict(
        experiment=experiment,
        seed=seed,
        data=data_dir,
        stores=stores_root,
        checkpoint_out=checkpoint_out,
        metrics_out=metrics_out,
        curve_out=curve_out,
        resume=resume,
        teacher_checkpoints=teacher_checkpoints,
    )
    kept = "the training state of finished epochs is kept: run the same command again to resume"
    if _relaunch(
        ctx, resolved.nproc, device, key="student_train.nproc", what=checkpoint_out, kept=kept, **options
    ):
        top1 = json.loads(Path(metrics_out).read_text())["test_top1"]
        click.echo(
            f"student {experiment}: test top-1 {top1:.4f} -> {metrics_out} ({resolved.nproc} processes)"
        )
        return
    stores_dir = Path(stores_root) / resolved.teacher if resolved.teacher is not None else None
    metrics = student_train.run(
        resolved,
        temperature_config=params.temperature,
        data_dir=data_dir,
        stores_dir=stores_dir,
        checkpoint_out=checkpoint_out,
        metrics_out=metrics_out,
        curve_out=curve_out,
        device=device,
        resume=resume,
        data_config=params.data,
        overrides=params.student_train.overrides(experiment),
        teacher_checkpoint=None
        if resolved.teacher is None
        else Path(teacher_checkpoints) / f"{resolved.teacher}.pt",
        epsilon=params.adjust.epsilon,
    )
    if not metrics or os.environ.get(RANK_ERRORS):  # another rank, or the launching process, reports
        return
    ranks = ranks_from_env()
    shared = f" ({ranks.world_size} processes)" if ranks.distributed else ""
    click.echo(f"student {experiment}: test top-1 {metrics['test_top1']:.4f} -> {metrics_out}{shared}")


@main.command("store-digests")
@click.option("--experiment", required=True, help="Name in student_train.experiments.")
@click.option(
    "--stores",
    "stores_root",
    default="stores",
    show_default=True,
    type=click.Path(),
    help="Folder holding one store folder per teacher.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Digest file to write.")
@click.pass_context
@friendly
def store_digests_command(ctx: click.Context, experiment: str, stores_root: str, out: str) -> None:
    """Digest the stores one student experiment reads (its dvc dep: nothing else reruns it)."""
    from stages import store_digests

    resolved = _params(ctx).student_train.experiment(experiment)
    summary = store_digests.run(resolved, stores_root=stores_root, out=out)
    click.echo(f"{out}: student {experiment} reads {sorted(summary['stores']) or 'no store'}")


@main.command("check-params")
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a fixed marker file when the check passes (the dvc stage's output).",
)
@click.pass_context
@friendly
def check_params_command(ctx: click.Context, out: str | None) -> None:
    """Check params.yaml as a whole before any stage runs (dvc runs this first, so a bad value
    never gets as far as a stage that would delete its old outputs)."""
    import nets
    from pipeline.checks import check_environment

    params = _params(ctx)
    names = params.check_pipeline(nets.available_nets())
    check_environment(params)
    if out is not None:
        from storage import atomic_write_json
        from storage.atomic import ensure_parents

        ensure_parents(out)
        atomic_write_json(out, {"params": "checked"})  # fixed content: later stages never rerun for it
    click.echo(
        f"params: {len(params.teacher_train.teachers)} teacher(s), {len(names)} experiment(s) x "
        f"{len(params.student_train.seeds)} seed(s): ok"
    )


@main.command("report")
@click.option(
    "--students",
    "students_dir",
    default="metrics/students",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Student metrics (*.json).",
)
@click.option(
    "--curves",
    "curves_dir",
    default="plots/students",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Student learning curves (*.json).",
)
@click.option(
    "--metrics-root",
    default="metrics",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Holds teachers/, adjust/ and temperature/ metrics.",
)
@click.option(
    "--histograms",
    "histograms_dir",
    default="plots/temperature",
    show_default=True,
    type=click.Path(file_okay=False),
    help="DTD temperature histograms (*.json).",
)
@click.option("--out", "out_dir", default="reports", show_default=True, type=click.Path(file_okay=False))
@click.pass_context
@friendly
def report_command(
    ctx: click.Context,
    students_dir: str,
    curves_dir: str,
    metrics_root: str,
    histograms_dir: str,
    out_dir: str,
) -> None:
    """Write reports/summary.md and plots: the configured student experiments side by side.

    Exactly the experiments x seeds of params.yaml; files of others are named, never deleted."""
    from stages import report

    params = _params(ctx)
    inputs = report.configured_inputs(
        runs=params.student_train.runs(),
        teachers=list(params.teacher_train.teachers),
        adjust_methods=list(params.adjust.methods),
        students_dir=students_dir,
        curves_dir=curves_dir,
        metrics_root=metrics_root,
        histograms_dir=histograms_dir,
    )
    summary = report.run(
        params.report,
        **inputs,
        out_dir=out_dir,
        dataset=params.data.name,
        params_name=Path(ctx.obj["params_path"]).name,
    )
    click.echo(f"Report: {summary}")


@main.command("import-logits")
@click.argument("h5_file", type=click.Path(dir_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Store to write.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--teacher", default="imported", show_default=True, help="Name recorded in the store.")
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default=None,
    help="Storage dtype (default: teacher_dump.dtype).",
)
@click.pass_context
@friendly
def import_logits_command(
    ctx: click.Context, h5_file: str, data_dir: str, out: str, split: str, teacher: str, dtype: str | None
) -> None:
    """Turn teacher logits computed elsewhere (HDF5) into a checked store for this dataset."""
    from stages import interchange

    config = _params(ctx).teacher_dump
    rows = interchange.import_logits(
        h5_file,
        data_dir=data_dir,
        out=out,
        split=split,
        teacher=teacher,
        dtype=dtype or config.dtype,
        chunk_rows=config.chunk_size,
    )
    click.echo(f"{out}: {rows} rows imported from {h5_file}")


@main.command("export")
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("h5_file", type=click.Path(dir_okay=False))
@friendly
def export_command(store: str, h5_file: str) -> None:
    """Write any store (arrays and attributes) to an HDF5 file."""
    from storage import open_store
    from storage.h5 import export_h5

    export_h5(open_store(store, layouts=("dense", "topk")), h5_file)  # any store, as it is
    click.echo(f"{h5_file}: exported {store}")


@main.command("verify-views")
@click.argument("store", type=click.Path(file_okay=False))
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="The prepared dataset the store was dumped from.",
)
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="The teacher checkpoint.")
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="How many random (view, sample) pairs to replay.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Which pairs.")
@click.pass_context
@friendly
def verify_views_command(
    ctx: click.Context, store: str, data_dir: str, checkpoint: str, samples: int, seed: int
) -> None:
    """Replay stored views through the teacher: the largest |Δ logit| against the store (exit 1
    above the tolerance float16 storage justifies)."""
    _ready_torch()
    from stages import verify_views
    from storage import StoreError

    result = verify_views.run(store, data_dir=data_dir, checkpoint=checkpoint, samples=samples, seed=seed)
    line = (
        f"{store}: replayed {result['pairs']} (view, sample) pairs of {result['views']} views: max |Δ logit| "
        f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:.3g})"
    )
    if not result["ok"]:
        raise StoreError(
            f"{line}: the store does not hold what this teacher gives on its views; rebuild it "
            "(lessons teacher-dump)"
        )
    click.echo(line + ": ok")


def run_main() -> None:  # pragma: no cover - thin wrapper for `python -m pipeline`
    main(prog_name="lessons", obj={})


if __name__ == "__main__":  # pragma: no cover
    run_main()

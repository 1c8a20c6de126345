"""Nothing lessons did not write is ever deleted or overwritten.

Every writer uses a few sibling names beside its output (storage/atomic.py lists them): a user's
file or folder at any of them, or a symbolic link given as the output, must survive every run
untouched, and the run either works around it (unique temporary names) or refuses at once with
one line.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from storage import ArraySpec, StoreWriter, open_store
from storage.atomic import OutputError
from tests.reliability.conftest import Pipeline, cli, leftovers, ok, one_line_error, teacher_h5

pytestmark = pytest.mark.slow

USER_TEXT = "a user's notes: never delete me\n"


def user_folder(path: Path, name: str = "NOTES.txt") -> Path:
    """A user's folder at `path` holding one file; returns the file."""
    path.mkdir(parents=True)
    (path / name).write_text(USER_TEXT)
    return path / name


def _prepare_data(pipeline: Pipeline, work: Path, out: Path) -> list[str]:
    return ["prepare-data", "--out", out]


def _teacher_dump(pipeline: Pipeline, work: Path, out: Path) -> list[str]:
    return [
        "teacher-dump",
        "--teacher",
        "t",
        "--data",
        pipeline.data,
        "--checkpoint",
        pipeline.checkpoint,
        "--out",
        out,
        "--test-out",
        work / "test-logits.zarr",
    ]


def _adjust(pipeline: Pipeline, work: Path, out: Path) -> list[str]:
    return [
        "adjust",
        "--method",
        "lsr",
        "--logits",
        work / "stores" / "t" / "logits.zarr",
        "--out",
        out,
        "--metrics-out",
        work / "m.json",
    ]


def _temperature(pipeline: Pipeline, work: Path, out: Path) -> list[str]:
    return [
        "temperature",
        "--logits",
        work / "stores" / "t" / "logits.zarr",
        "--out",
        out,
        "--metrics-out",
        work / "m.json",
        "--histogram-out",
        work / "h.json",
    ]


def _import_logits(pipeline: Pipeline, work: Path, out: Path) -> list[str]:
    h5 = work / "foreign.h5"
    if not h5.exists():
        teacher_h5(work / "stores" / "t" / "logits.zarr", h5)
    return ["import-logits", h5, "--data", pipeline.data, "--out", out]


WRITERS: dict[str, tuple[Callable[[Pipeline, Path, Path], list[str]], str]] = {
    "prepare-data": (_prepare_data, "data"),
    "teacher-dump": (_teacher_dump, "logits.zarr"),
    "adjust": (_adjust, "adjusted-lsr.zarr"),
    "temperature": (_temperature, "dtd.zarr"),
    "import-logits": (_import_logits, "imported.zarr"),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_user_folders_at_the_old_names_survive_two_runs_of_every_folder_writer(
    writer: str, work: Path, pipeline: Pipeline
) -> None:
    args, name = WRITERS[writer]
    out = work / "out" / name
    kept = [
        user_folder(out.with_name(out.name + ".old")),
        user_folder(out.with_name(f".{out.name}.old"), "thesis.tex"),
        user_folder(out.with_name(out.name + ".bak")),
    ]
    for _ in range(2):  # the first run creates the output, the second replaces it
        ok(cli(pipeline.params_path, *args(pipeline, work, out)))
        assert all(f.read_text() == USER_TEXT for f in kept)
        # The previous output was moved aside under a unique name and is gone again.
        assert not list(out.parent.glob(f".{out.name}.*.old")), leftovers(out)
    assert (out / ("manifest.json" if writer == "prepare-data" else "zarr.json")).is_file()


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_user_folder_at_the_partial_name_is_refused_and_kept(
    writer: str, work: Path, pipeline: Pipeline
) -> None:
    args, name = WRITERS[writer]
    out = work / "out" / name
    notes = user_folder(out.with_name(out.name + ".partial"))
    line = one_line_error(cli(pipeline.params_path, *args(pipeline, work, out)), str(notes.parent))
    assert "did not create" in line and "move it away" in line
    assert notes.read_text() == USER_TEXT
    assert not out.exists()


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_symlinked_output_is_refused_at_once_and_neither_side_changes(
    writer: str, work: Path, pipeline: Pipeline
) -> None:
    args, name = WRITERS[writer]
    target = work / "elsewhere" / name
    notes = user_folder(target)
    out = work / "out" / name
    out.parent.mkdir(parents=True)
    out.symlink_to(target, target_is_directory=True)
    for _ in range(2):  # the same one line every time, never a computed-then-failed run
        line = one_line_error(cli(pipeline.params_path, *args(pipeline, work, out)), str(out))
        assert "symbolic link" in line and str(target) in line
    assert out.is_symlink() and os.readlink(out) == str(target)
    assert sorted(p.name for p in target.iterdir()) == ["NOTES.txt"] and notes.read_text() == USER_TEXT
    assert leftovers(out) == [name]  # the link itself, nothing beside it


def test_a_symlink_to_an_earlier_store_is_refused_and_the_store_is_kept(
    work: Path, pipeline: Pipeline
) -> None:
    target = work / "stores" / "t" / "dtd.zarr"
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    out = work / "out" / "dtd.zarr"
    out.parent.mkdir()
    out.symlink_to(target, target_is_directory=True)
    one_line_error(cli(pipeline.params_path, *_temperature(pipeline, work, out)), "symbolic link")
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    open_store(target, kind="dtd")  # still a complete, valid store


@pytest.mark.parametrize("kind", ["folder", "symlink"])
def test_a_user_folder_or_link_at_the_lock_name_is_refused_and_kept(
    kind: str, work: Path, pipeline: Pipeline
) -> None:
    out = work / "out" / "dtd.zarr"
    lock = out.with_name(out.name + ".lock")
    notes = user_folder(work / "mine") if kind == "symlink" else user_folder(lock)
    if kind == "symlink":
        lock.parent.mkdir(parents=True)
        lock.symlink_to(notes)
    line = one_line_error(cli(pipeline.params_path, *_temperature(pipeline, work, out)), str(lock))
    assert ("symbolic link" if kind == "symlink" else "folder") in line
    assert notes.read_text() == USER_TEXT and not out.exists()


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_user_folder_or_file_at_the_training_state_name_is_refused_and_kept(
    kind: str, tmp_path: Path, pipeline: Pipeline
) -> None:
    checkpoint = tmp_path / "t.pt"
    state = checkpoint.with_name("t.pt.state")
    if kind == "folder":
        notes = user_folder(state)
    else:
        state.write_text(USER_TEXT)
        notes = state
    result = cli(
        pipeline.params_path,
        "teacher-train",
        "--teacher",
        "t",
        "--data",
        pipeline.data,
        "--checkpoint-out",
        checkpoint,
        "--metrics-out",
        tmp_path / "m.json",
        "--curve-out",
        tmp_path / "c.json",
    )
    line = one_line_error(result, str(state))
    assert "not a training state" in line and "move it away" in line
    assert notes.read_text() == USER_TEXT
    assert not checkpoint.exists() and not (tmp_path / "m.json").exists()


def test_export_never_overwrites_a_user_file_and_replaces_its_own_export(
    work: Path, pipeline: Pipeline
) -> None:
    store = work / "stores" / "t" / "dtd.zarr"
    mine = work / "results.h5"
    mine.write_text(USER_TEXT)
    beside = work / "export.h5.partial"  # the fixed temporary name of earlier versions
    beside.write_text(USER_TEXT)
    one_line_error(cli(pipeline.params_path, "export", store, mine), str(mine), "not an HDF5 export")
    assert mine.read_text() == USER_TEXT
    export = work / "export.h5"
    for _ in range(2):  # the second run replaces the first export
        ok(cli(pipeline.params_path, "export", store, export))
    assert beside.read_text() == USER_TEXT
    assert not list(work.glob(".export.h5.*"))


def test_a_folder_where_a_metrics_file_goes_is_refused_before_any_work(
    work: Path, pipeline: Pipeline
) -> None:
    metrics = work / "m.json"
    notes = user_folder(metrics)
    out = work / "out" / "dtd.zarr"
    args = _temperature(pipeline, work, out)
    line = one_line_error(cli(pipeline.params_path, *args), str(metrics))
    assert "folder" in line or "directory" in line
    assert notes.read_text() == USER_TEXT and leftovers(out) == []


def test_a_full_disk_while_a_store_is_created_leaves_no_partial_folder(
    work: Path, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zarr

    real = zarr.Group.create_array
    calls = []

    def fill_up(self, name, **kwargs):  # the second array no longer fits
        calls.append(name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", fill_up)
    out = work / "out" / "dtd.zarr"
    one_line_error(cli(pipeline.params_path, *_temperature(pipeline, work, out)), "no space left")
    assert len(calls) == 2 and leftovers(out) == []


def test_a_failed_parallel_write_leaves_no_partial_even_with_a_block_still_writing(tmp_path: Path) -> None:
    """Dask raises as soon as one block fails, while another block may still be computing and
    will write its chunk: the writer must wait for it before cleaning up (the race that left
    `dtd.zarr.partial` behind under load)."""
    out = tmp_path / "s.zarr"
    started = threading.Event()

    def block(x: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        if block_info[0]["chunk-location"][0] == 0:
            started.wait(5)  # fail only once the slow block is running
            raise ValueError("a damaged chunk")
        started.set()
        time.sleep(0.5)
        return x + 1

    values = da.map_blocks(block, da.zeros((8,), chunks=4, dtype="float32"), dtype=np.float32)
    with (
        pytest.raises(ValueError, match="a damaged chunk"),
        StoreWriter(
            out, kind="test", arrays={"x": ArraySpec((8,), "float32")}, attrs={}, chunk_rows=4
        ) as writer,
    ):
        writer.write_dask({"x": values})
    time.sleep(1.0)  # any straggler would have written by now
    assert leftovers(out) == []


def test_replace_dir_refuses_to_publish_a_folder_lessons_did_not_create(tmp_path: Path) -> None:
    from storage.atomic import replace_dir

    src = tmp_path / "mine"
    notes = user_folder(src)
    with pytest.raises(OutputError, match="not a work folder"):
        replace_dir(src, tmp_path / "out", marker="zarr.json", what="a zarr store")
    assert notes.read_text() == USER_TEXT


def test_prepare_data_never_replaces_a_user_folder_that_merely_holds_a_manifest_json(tmp_path, pipeline):
    out = tmp_path / "data"
    notes = user_folder(out)
    (out / "manifest.json").write_text('{"my": "own manifest"}')
    one_line_error(
        cli(pipeline.params_path, "prepare-data", "--out", out), str(out), "not a prepared dataset"
    )
    assert notes.read_text() == USER_TEXT and (out / "manifest.json").read_text() == '{"my": "own manifest"}'


def _teacher_train(pipeline: Pipeline, tmp_path: Path, checkpoint: Path, metrics: Path) -> list[str]:
    return [
        "teacher-train",
        "--teacher",
        "t",
        "--data",
        pipeline.data,
        "--checkpoint-out",
        checkpoint,
        "--metrics-out",
        metrics,
        "--curve-out",
        tmp_path / "c.json",
    ]


@pytest.mark.parametrize("which", ["checkpoint", "metrics"])
def test_a_user_file_at_a_file_output_is_refused_before_training_and_kept(which, tmp_path, pipeline):
    checkpoint, metrics = tmp_path / "t.pt", tmp_path / "m.json"
    mine = checkpoint if which == "checkpoint" else metrics
    mine.write_text(USER_TEXT)  # not a checkpoint, not JSON
    line = one_line_error(
        cli(pipeline.params_path, *_teacher_train(pipeline, tmp_path, checkpoint, metrics)), str(mine)
    )
    assert "lessons only replaces its own outputs" in line
    assert mine.read_text() == USER_TEXT and not (tmp_path / "c.json").exists()


def test_a_symlinked_file_output_is_refused_and_its_target_kept(tmp_path, pipeline):
    target = tmp_path / "mine.pt"
    target.write_text(USER_TEXT)
    checkpoint = tmp_path / "t.pt"
    checkpoint.symlink_to(target)
    line = one_line_error(
        cli(pipeline.params_path, *_teacher_train(pipeline, tmp_path, checkpoint, tmp_path / "m.json")),
        str(checkpoint),
    )
    assert "symbolic link" in line
    assert checkpoint.is_symlink() and target.read_text() == USER_TEXT


def test_a_second_teacher_run_replaces_its_own_checkpoint_and_metrics(tmp_path, pipeline):
    checkpoint, metrics = tmp_path / "t.pt", tmp_path / "m.json"
    for _ in range(2):
        ok(cli(pipeline.params_path, *_teacher_train(pipeline, tmp_path, checkpoint, metrics)))
    assert checkpoint.is_file() and metrics.is_file()


@pytest.mark.parametrize("name", ["summary.md", "accuracy.png"])
def test_report_and_check_params_never_overwrite_a_user_file(name, tmp_path, pipeline):
    mine = tmp_path / "reports" / name
    mine.parent.mkdir()
    mine.write_text(USER_TEXT)
    from pipeline.config import ReportConfig
    from stages import report

    student = tmp_path / "ce-seed0.json"
    student.write_text('{"experiment": "ce", "test_top1": 0.5, "seed": 0}')
    with pytest.raises(OutputError, match="lessons only replaces its own outputs"):
        report.run(
            ReportConfig(),
            students=[student],
            teachers=[],
            adjust_metrics=[],
            temperature_metrics=[],
            temperature_histograms=[],
            out_dir=mine.parent,
        )
    assert mine.read_text() == USER_TEXT
    notes = tmp_path / "check.json"
    notes.write_text(USER_TEXT)
    one_line_error(cli(pipeline.params_path, "check-params", "--out", notes), str(notes))
    assert notes.read_text() == USER_TEXT


def test_teacher_dump_checks_the_test_output_before_it_dumps_and_publishes_the_train_store(work, pipeline):
    stores = work / "out"
    notes = user_folder(stores / "test-logits.zarr.partial")
    line = one_line_error(
        cli(
            pipeline.params_path,
            "teacher-dump",
            "--teacher",
            "t",
            "--data",
            pipeline.data,
            "--checkpoint",
            pipeline.checkpoint,
            "--out",
            stores / "logits.zarr",
            "--test-out",
            stores / "test-logits.zarr",
        ),
        str(notes.parent),
    )
    assert "did not create" in line and notes.read_text() == USER_TEXT
    assert leftovers(stores / "logits.zarr") == []  # no new train store beside an old test store


def test_a_forked_child_that_outlives_the_writer_does_not_keep_its_output_locked(tmp_path):
    # ffcv's and dask's pools fork; a child still alive after the writer's `with` block must not
    # hold `<out>.lock`, or the next run is refused as "another process is writing this output".
    import os
    import signal
    import time

    from storage.atomic import exclusive_lock

    out = tmp_path / "out"
    ready, started = os.pipe()
    with exclusive_lock(out):
        child = os.fork()
        if child == 0:  # a lingering pool worker (the fork hooks have run once it runs)
            os.write(started, b"1")
            time.sleep(30)
            os._exit(0)
        assert os.read(ready, 1) == b"1"
    try:
        with exclusive_lock(out):  # the writer is done: its lock is free although the child lives
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)

"""Interrupted work: a SIGKILLed stage leaves nothing that looks finished, and a rerun resumes
and produces exactly what an uninterrupted run produces."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from storage import StoreError, open_store
from tests.reliability.conftest import (
    CHUNK,
    NUM_TRAIN,
    cli,
    ok,
    one_line_error,
    spawn_cli,
    tree_digest,
    wait_for,
    write_params,
)


def _kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow  # a real `lessons` process (~20 s)
def test_a_teacher_dump_killed_after_one_chunk_resumes_and_ends_byte_identical(tmp_path, pipeline):
    out, test_out = tmp_path / "stores" / "t" / "logits.zarr", tmp_path / "stores" / "t" / "test-logits.zarr"
    marks = out.with_name(out.name + ".partial") / ".lessons" / "done"
    args = (
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
        test_out,
    )
    log = tmp_path / "child.log"
    proc = spawn_cli(pipeline.params_path, *args, cwd=tmp_path, pause_s=60, log=log)
    try:
        wait_for(
            lambda: marks.is_dir() and any(m.name.isdigit() for m in marks.iterdir()),
            proc,
            240,
            "the first chunk mark",
            log,
        )
        # While it runs, a second dump of the same store is refused at once, touching nothing.
        before = tree_digest(marks.parent.parent)
        one_line_error(cli(pipeline.params_path, *args), "another process is writing this output")
        assert tree_digest(marks.parent.parent) == before
    finally:
        _kill(proc)

    # Nothing that looks finished: no store, and reading one is refused with the resume hint.
    assert not out.exists() and not test_out.exists()
    with pytest.raises(StoreError, match="unfinished write exists beside it"):
        open_store(out)
    done = sum(m.name.isdigit() for m in marks.iterdir())
    num_chunks = -(-NUM_TRAIN // CHUNK)
    assert 1 <= done < num_chunks

    result = ok(cli(pipeline.params_path, *args))
    assert f"resuming, {done} of {num_chunks} chunks already written" in result.output
    assert not out.with_name(out.name + ".partial").exists()
    resumed, reference = open_store(out), open_store(pipeline.teacher_stores / "logits.zarr")
    for name in ("logits", "labels", "sample_index", "view_params"):
        a, b = resumed.read(name), reference.read(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    # The files themselves (chunks, metadata, attributes) are byte-identical too.
    assert tree_digest(out) == tree_digest(pipeline.teacher_stores / "logits.zarr")
    assert tree_digest(test_out) == tree_digest(pipeline.teacher_stores / "test-logits.zarr")


def _student_args(root: Path, name: str, stores: Path, data: Path) -> tuple:
    return (
        "student-train",
        "--experiment",
        "kd_ps_2ep",
        "--data",
        data,
        "--stores",
        stores,
        "--checkpoint-out",
        root / f"{name}.pt",
        "--metrics-out",
        root / f"{name}.json",
        "--curve-out",
        root / f"{name}-curve.json",
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow  # a real `lessons` process (~20 s)
def test_a_student_killed_after_epoch_one_of_two_resumes_to_the_uninterrupted_result(tmp_path, pipeline):
    stores, data = pipeline.stores, pipeline.data
    killed = _student_args(tmp_path, "resumed", stores, data)
    state = tmp_path / "resumed.pt.state"
    log = tmp_path / "child.log"
    proc = spawn_cli(pipeline.params_path, *killed, cwd=tmp_path, pause_s=60, log=log)
    try:
        wait_for(state.is_file, proc, 240, "the epoch-1 training state", log)
        # While it runs, a second run writing the same checkpoint is refused before training.
        saved = state.read_bytes()
        second = cli(pipeline.params_path, *killed)
        one_line_error(second, "resumed.pt", "another process is writing")
        assert "epoch 1/2" not in second.output and state.read_bytes() == saved
    finally:
        _kill(proc)
    # Killed between epochs: no checkpoint or metrics that look finished.
    assert not (tmp_path / "resumed.pt").exists() and not (tmp_path / "resumed.json").exists()

    result = ok(cli(pipeline.params_path, *killed))  # resume is the default
    assert "resuming after epoch 1 of 2" in result.output
    assert not state.exists()
    ok(cli(pipeline.params_path, *_student_args(tmp_path, "straight", stores, data)))

    resumed = json.loads((tmp_path / "resumed.json").read_text())
    straight = json.loads((tmp_path / "straight.json").read_text())
    timing = {"wall_s", "images_per_s"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in straight.items() if k not in timing
    }

    def curve(name: str) -> list[dict]:
        return [
            {k: v for k, v in row.items() if k != "elapsed_s"}
            for row in json.loads((tmp_path / f"{name}-curve.json").read_text())
        ]

    assert curve("resumed") == curve("straight") and len(curve("resumed")) == 2
    a, b = _weights(tmp_path / "resumed.pt"), _weights(tmp_path / "straight.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _teacher_args(root: Path, name: str, data: Path) -> tuple:
    return (
        "teacher-train",
        "--teacher",
        "t",
        "--data",
        data,
        "--checkpoint-out",
        root / f"{name}.pt",
        "--metrics-out",
        root / f"{name}.json",
        "--curve-out",
        root / f"{name}-curve.json",
    )


@pytest.mark.slow  # a real `lessons` process (~20 s)
def test_a_teacher_killed_after_epoch_one_of_two_resumes_by_default_as_dvc_runs_it(tmp_path, pipeline):
    teacher = {**pipeline.params["teacher_train"]["teachers"]["t"], "epochs": 2}
    params = write_params(
        tmp_path / "params.yaml", pipeline.params, teacher_train={"teachers": {"t": teacher}}
    )
    killed = _teacher_args(tmp_path, "resumed", pipeline.data)
    state, log = tmp_path / "resumed.pt.state", tmp_path / "child.log"
    proc = spawn_cli(params, *killed, cwd=tmp_path, pause_s=60, log=log)
    try:
        wait_for(state.is_file, proc, 240, "the epoch-1 training state", log)
    finally:
        _kill(proc)
    assert not (tmp_path / "resumed.pt").exists()

    result = ok(cli(params, *killed))  # the command dvc.yaml runs: no flag, so resume is the default
    assert "resuming after epoch 1 of 2" in result.output
    assert not state.exists()
    ok(cli(params, *_teacher_args(tmp_path, "straight", pipeline.data)))
    a, b = _weights(tmp_path / "resumed.pt"), _weights(tmp_path / "straight.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    # --no-resume starts afresh from a saved state (and still ends at the same weights).
    proc = spawn_cli(
        params, *_teacher_args(tmp_path, "fresh", pipeline.data), cwd=tmp_path, pause_s=60, log=log
    )
    try:
        wait_for((tmp_path / "fresh.pt.state").is_file, proc, 240, "the epoch-1 training state", log)
    finally:
        _kill(proc)
    result = ok(cli(params, *_teacher_args(tmp_path, "fresh", pipeline.data), "--no-resume"))
    assert "resuming" not in result.output and "epoch 1/2" in result.output
    fresh = _weights(tmp_path / "fresh.pt")
    assert all(torch.equal(a[key], fresh[key]) for key in a)


def _interrupt_after_first_chunk(monkeypatch, params, args) -> None:
    """Run a dump in this process that gets Ctrl-C right after its first chunk is marked."""
    import storage.soft_labels as soft_labels

    write_chunk = soft_labels.StoreWriter.write_chunk

    def interrupted(self, chunk, values):
        write_chunk(self, chunk, values)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(soft_labels.StoreWriter, "write_chunk", interrupted)
        result = cli(params, *args)
    assert isinstance(result.exception, KeyboardInterrupt) or result.exit_code != 0


def _dump_args(pipeline, out: Path) -> tuple:
    return (
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
        out.with_name("test-" + out.name),
    )


def test_a_ctrl_c_keeps_the_finished_chunk_and_stray_temporary_files_do_not_reach_the_store(
    tmp_path, pipeline, monkeypatch
):
    out = tmp_path / "logits.zarr"
    marks = out.with_name(out.name + ".partial") / ".lessons" / "done"
    _interrupt_after_first_chunk(monkeypatch, pipeline.params_path, _dump_args(pipeline, out))
    assert not out.exists()
    assert [m.name for m in marks.iterdir()] == ["0"]
    (marks / ".1.x8k2_q0a").write_bytes(b"")  # what a kill inside atomic_write_bytes leaves
    # ... and a kill inside zarr's chunk write (a torchrun rank killed mid-chunk, say): its
    # temporary `<chunk>.<random>.partial` beside the chunks; the chunk is rewritten on resume.
    torn = out.with_name(out.name + ".partial") / "labels" / "c" / "1.f14157c8d2.partial"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"")

    result = ok(cli(pipeline.params_path, *_dump_args(pipeline, out)))
    assert f"resuming, 1 of {-(-NUM_TRAIN // CHUNK)} chunks already written" in result.output
    assert tree_digest(out) == tree_digest(pipeline.teacher_stores / "logits.zarr")


def test_an_unfinished_dump_is_discarded_by_a_rerun_with_other_settings(tmp_path, pipeline, monkeypatch):
    out = tmp_path / "logits.zarr"
    _interrupt_after_first_chunk(monkeypatch, pipeline.params_path, _dump_args(pipeline, out))
    write_params(tmp_path / "float32.yaml", pipeline.params, teacher_dump={"dtype": "float32"})
    result = ok(cli(tmp_path / "float32.yaml", *_dump_args(pipeline, out)))
    assert "discarding an unfinished write made with other settings" in result.output
    logits = open_store(out).read("logits")
    assert logits.dtype == np.float32
    reference = open_store(pipeline.teacher_stores / "logits.zarr").read("logits")
    np.testing.assert_array_equal(logits.astype(np.float16), reference)


def test_a_killed_student_does_not_resume_once_its_soft_labels_were_rebuilt_differently(tmp_path, pipeline):
    """Killed after epoch 1, then KA-PS rebuilt with other logits (a float32 re-dump): resuming
    would train on the old targets, then the new ones; the run starts afresh instead."""
    import shutil

    stores = tmp_path / "stores"
    shutil.copytree(pipeline.stores, stores, ignore=shutil.ignore_patterns("*.lock"))
    killed = _student_args(tmp_path, "s", stores, pipeline.data)
    state = tmp_path / "s.pt.state"
    log = tmp_path / "child.log"
    proc = spawn_cli(pipeline.params_path, *killed, cwd=tmp_path, pause_s=60, log=log)
    try:
        wait_for(state.is_file, proc, 240, "the epoch-1 training state", log)
    finally:
        _kill(proc)
    params = write_params(tmp_path / "params.yaml", pipeline.params, teacher_dump={"dtype": "float32"})
    teacher = stores / "t"
    ok(
        cli(
            params,
            "teacher-dump",
            "--teacher",
            "t",
            "--data",
            pipeline.data,
            "--checkpoint",
            pipeline.checkpoint,
            "--out",
            teacher / "logits.zarr",
            "--test-out",
            teacher / "test-logits.zarr",
        )
    )
    for method in ("ps", "lsr"):
        ok(
            cli(
                params,
                "adjust",
                "--method",
                method,
                "--logits",
                teacher / "logits.zarr",
                "--out",
                teacher / f"adjusted-{method}.zarr",
                "--metrics-out",
                tmp_path / f"{method}.json",
            )
        )
    ok(
        cli(
            params,
            "temperature",
            "--logits",
            teacher / "logits.zarr",
            "--out",
            teacher / "dtd.zarr",
            "--metrics-out",
            tmp_path / "dtd.json",
            "--histogram-out",
            tmp_path / "hist.json",
        )
    )
    result = ok(cli(pipeline.params_path, *killed))
    assert "resuming" not in result.output and "saved by a run with other settings" in result.output
    assert len(json.loads((tmp_path / "s-curve.json").read_text())) == 2 and not state.exists()

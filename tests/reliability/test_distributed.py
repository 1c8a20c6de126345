"""The teacher dump and the students under torchrun (DESIGN §6): gloo ranks on this CPU write the
store that one process writes, byte for byte; a dump killed under 2 ranks resumes under 1; a failed
rank is one line and the lock of a running job is respected. A 2-rank student writes its outputs
once and ends where one process does; killed after an epoch, it resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage import StoreError, open_store
from tests.reliability.conftest import (
    CHUNK,
    NUM_TEST,
    NUM_TRAIN,
    child_env,
    cli,
    ok,
    one_line_error,
    spawn_cli,
    tree_digest,
    wait_for,
    write_params,
)

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for 2 ranks")


def _dump_args(pipeline, root: Path, *, views_out: str = "t") -> tuple:
    stores = root / "stores" / views_out
    return (
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
    )


@pytest.fixture
def ranks_env(monkeypatch):
    """Ranks started by the launcher import this checkout's code, as the test process does."""
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])


@pytest.mark.slow  # 2 torchrun ranks (~40 s)
def test_a_two_rank_dump_writes_the_one_process_store_byte_for_byte(tmp_path, pipeline, ranks_env, capfd):
    params = write_params(tmp_path / "params.yaml", pipeline.params, teacher_dump={"nproc": 2})
    args = _dump_args(pipeline, tmp_path)
    capfd.readouterr()
    result = ok(cli(params, *args))
    ranks_said = capfd.readouterr()  # the ranks' own stdout and stderr (child processes)
    assert "(2 processes)" in result.output  # one result line, from the launching process
    assert "teacher t: logits in" not in ranks_said.out
    assert ranks_said.err.count("dumped 320 views") == 1  # rank 0 logs for the job, rank 1 is quiet
    out = tmp_path / "stores" / "t"
    for name in ("logits.zarr", "test-logits.zarr"):
        assert tree_digest(out / name) == tree_digest(pipeline.teacher_stores / name), name
        assert not (out / f"{name}.partial").exists()


@pytest.mark.slow  # torchrun, 2 ranks, one killed; then a 1-process resume (~60 s)
def test_a_dump_killed_under_two_ranks_resumes_under_one_byte_identical(tmp_path, pipeline):
    args = _dump_args(pipeline, tmp_path)
    out = tmp_path / "stores" / "t" / "logits.zarr"
    marks = out.with_name(out.name + ".partial") / ".lessons" / "done"
    log = tmp_path / "torchrun.log"
    # The user's own torchrun (as on several hosts), each rank pausing after each chunk it writes.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(Path(__file__).with_name("slow_cli.py")),
        "--params",
        str(pipeline.params_path),
        *map(str, args),
    ]
    env = {**child_env(), "LESSONS_TEST_PAUSE_S": "60", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as stream:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for(
            lambda: marks.is_dir() and sum(m.name.isdigit() for m in marks.iterdir()) >= 2,
            proc,
            300,
            "a chunk mark from each rank",
            log,
        )
        # While it runs, an independent dump of the same store is refused at once.
        before = tree_digest(marks.parent.parent)
        one_line_error(cli(pipeline.params_path, *args), "another process is writing this output")
        assert tree_digest(marks.parent.parent) == before
        ranks = subprocess.run(
            ["pgrep", "-f", "-P", str(proc.pid), "slow_cli.py"], capture_output=True, text=True
        ).stdout.split()
        assert len(ranks) == 2, ranks
        os.kill(int(ranks[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert not out.exists()  # nothing that looks finished
    with pytest.raises(StoreError, match="unfinished write exists beside it"):
        open_store(out)
    done = sum(m.name.isdigit() for m in marks.iterdir())
    num_chunks = -(-NUM_TRAIN // CHUNK)
    assert 2 <= done < num_chunks

    result = ok(cli(pipeline.params_path, *args))  # nproc 1 (the default)
    assert f"resuming, {done} of {num_chunks} chunks already written" in result.output
    assert tree_digest(out) == tree_digest(pipeline.teacher_stores / "logits.zarr")
    assert tree_digest(out.with_name("test-logits.zarr")) == tree_digest(
        pipeline.teacher_stores / "test-logits.zarr"
    )


@pytest.mark.slow  # 2 torchrun ranks, refused at once (~20 s)
def test_a_two_rank_dump_of_a_store_another_job_writes_is_refused_before_its_ranks_start(
    tmp_path, pipeline, ranks_env, monkeypatch
):
    args = _dump_args(pipeline, tmp_path)
    out = tmp_path / "stores" / "t" / "logits.zarr"
    marks = out.with_name(out.name + ".partial") / ".lessons" / "done"
    log = tmp_path / "child.log"
    proc = spawn_cli(pipeline.params_path, *args, cwd=tmp_path, pause_s=60, log=log)
    try:
        wait_for(lambda: marks.is_dir() and any(marks.iterdir()), proc, 240, "the first chunk mark", log)
        before = tree_digest(marks.parent.parent)
        params = write_params(tmp_path / "params2.yaml", pipeline.params, teacher_dump={"nproc": 2})
        launched = []
        monkeypatch.setattr("pipeline.cli.launch", lambda *a, **k: launched.append(a))
        one_line_error(cli(params, *args), "another process is writing this output", str(out))
        assert launched == []  # refused at once, by the launching process
        assert tree_digest(marks.parent.parent) == before
    finally:
        proc.kill()
        proc.wait()


def test_more_ranks_than_cores_is_one_line_before_anything_starts(tmp_path, pipeline):
    cores = len(os.sched_getaffinity(0))
    params = write_params(tmp_path / "params.yaml", pipeline.params, teacher_dump={"nproc": cores + 1})
    args = _dump_args(pipeline, tmp_path)
    one_line_error(cli(params, *args), "teacher_dump.nproc", f"at most {cores}")
    assert not (tmp_path / "stores").exists()


@pytest.mark.slow  # a dump and a replay (~15 s)
def test_a_bfloat16_autocast_dump_is_recorded_stays_near_float32_and_replays(tmp_path, pipeline):
    import numpy as np

    params = write_params(tmp_path / "params.yaml", pipeline.params, teacher_dump={"autocast": "bfloat16"})
    ok(cli(params, *_dump_args(pipeline, tmp_path)))
    store = open_store(tmp_path / "stores" / "t" / "logits.zarr")
    reference = open_store(pipeline.teacher_stores / "logits.zarr")
    assert store.attrs["teacher"]["forward_autocast"] == "bfloat16"
    assert "forward_autocast" not in reference.attrs["teacher"]
    got, want = store.read("logits").astype(np.float32), reference.read("logits").astype(np.float32)
    peak = float(np.abs(want).max())
    difference = float(np.abs(got - want).max())
    assert 0 < difference <= 2.0**-6 * peak + 2.0**-11 * peak  # rounded, by bfloat16's few ulps
    result = ok(
        cli(
            params,
            "verify-views",
            tmp_path / "stores" / "t" / "logits.zarr",
            "--data",
            pipeline.data,
            "--checkpoint",
            pipeline.checkpoint,
            "--samples",
            "64",
        )
    )
    assert result.output.strip().endswith(": ok")


def test_check_params_refuses_more_dump_or_student_ranks_than_cores(tmp_path, pipeline):
    cores = len(os.sched_getaffinity(0))
    params = write_params(tmp_path / "params.yaml", pipeline.params, teacher_dump={"nproc": cores + 1})
    one_line_error(cli(params, "check-params"), "teacher_dump.nproc", f"at most {cores}")
    params = write_params(tmp_path / "params.yaml", pipeline.params, teacher_dump={"nproc": cores})
    ok(cli(params, "check-params"))
    student = {**pipeline.params["student_train"], "nproc": cores + 1, "batch_size": 32 * (cores + 1)}
    params = write_params(tmp_path / "params.yaml", pipeline.params, student_train=student)
    one_line_error(cli(params, "check-params"), "student_train.nproc", f"at most {cores}")


# Students under DDP (DESIGN §6): `student_train.nproc` ranks each train on their share of every
# step's global batch; rank 0 evaluates and writes. The tiny students are MLPs (no BatchNorm) and
# `kd` has no batch statistics in its loss, so 2 ranks end where 1 process does up to float
# rounding of the gradient average (with BatchNorm, each rank would normalise its own half-batch).


def _student_args(pipeline, root: Path, name: str, experiment: str = "kd") -> tuple:
    return (
        "student-train",
        "--experiment",
        experiment,
        "--data",
        pipeline.data,
        "--stores",
        pipeline.stores,
        "--checkpoint-out",
        root / f"{name}.pt",
        "--metrics-out",
        root / f"{name}.json",
        "--curve-out",
        root / f"{name}-curve.json",
    )


def _student_params(path: Path, pipeline, nproc: int) -> Path:
    kd = {"teacher": "t", "adjust": "none", "dtd": "off", "epochs": 2}
    return write_params(
        path, pipeline.params, student_train={"nproc": nproc, "experiments": {"kd": kd, "ce": {"kd": False}}}
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def two_rank_student(tmp_path_factory, pipeline) -> Path:
    """The 2-epoch `kd` student trained by 2 ranks (`lessons student-train`, nproc 2): `kd.pt`..."""
    root = tmp_path_factory.mktemp("two-ranks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
        result = ok(
            cli(
                _student_params(root / "params.yaml", pipeline, 2),
                *_student_args(pipeline, root / "out", "kd"),
            )
        )
    assert "test top-1" in result.output and "(2 processes)" in result.output
    return root / "out"


@pytest.mark.slow  # a 1-process student, and the 2-rank one of the fixture (~30 s)
def test_a_two_rank_student_writes_its_outputs_once_and_ends_where_one_process_does(
    tmp_path, pipeline, two_rank_student
):
    one, two = tmp_path / "one", two_rank_student
    ok(cli(_student_params(tmp_path / "p1.yaml", pipeline, 1), *_student_args(pipeline, one, "kd")))

    # Written once, by rank 0: the four outputs (and the documented lock), nothing else.
    assert sorted(p.name for p in two.iterdir()) == [
        "kd-config.json",
        "kd-curve.json",
        "kd.json",
        "kd.pt",
        "kd.pt.lock",
    ]
    curve_one = json.loads((one / "kd-curve.json").read_text())
    curve_two = json.loads((two / "kd-curve.json").read_text())
    assert [row["epoch"] for row in curve_two] == [1, 2]
    assert json.loads((two / "kd-config.json").read_text())["config"]["nproc"] == 2
    # Same global batches, gradients averaged over the ranks: the same run up to float rounding.
    for a, b in zip(curve_one, curve_two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)
        assert b["lr"] == a["lr"]
        assert abs(b["test_top1"] - a["test_top1"]) <= 2 / NUM_TEST  # at most 2 of 64 test images
    weights_one, weights_two = _weights(one / "kd.pt"), _weights(two / "kd.pt")
    for key in weights_one:
        torch.testing.assert_close(weights_two[key], weights_one[key], atol=1e-4, rtol=1e-3)
    metrics_one = json.loads((one / "kd.json").read_text())
    metrics_two = json.loads((two / "kd.json").read_text())
    assert metrics_two.keys() == metrics_one.keys()
    assert abs(metrics_two["agreement_top1"] - metrics_one["agreement_top1"]) <= 2 / NUM_TEST


@pytest.mark.slow  # torchrun, 2 ranks killed after epoch 1, then resumed; the fixture's 2-rank run (~60 s)
def test_a_two_rank_student_killed_after_epoch_one_resumes_to_the_uninterrupted_result(
    tmp_path, pipeline, two_rank_student
):
    params = _student_params(tmp_path / "params.yaml", pipeline, 2)
    killed = _student_args(pipeline, tmp_path, "kd")
    state = tmp_path / "kd.pt.state"
    log = tmp_path / "torchrun.log"
    # The user's own torchrun, rank 0 pausing once it saved the epoch-1 training state.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(Path(__file__).with_name("slow_cli.py")),
        "--params",
        str(params),
        *map(str, killed),
    ]
    env = {**child_env(), "LESSONS_TEST_PAUSE_S": "60", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as stream:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for(state.is_file, proc, 240, "the epoch-1 training state", log)
        # While it runs, a second run writing the same checkpoint is refused (the lock rank 0 holds).
        saved = state.read_bytes()
        alone = _student_params(tmp_path / "alone.yaml", pipeline, 1)
        one_line_error(cli(alone, *killed), "kd.pt", "another process is writing")
        assert state.read_bytes() == saved
    finally:  # the ranks run in sessions of their own: kill them, then torchrun
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in ranks:
            os.kill(int(pid), signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "kd.pt").exists() and not (tmp_path / "kd.json").exists()
    epoch_one = torch.load(state, map_location="cpu", weights_only=True)["curve"]

    ok(cli(params, *killed))  # 2 ranks again (the state of a 2-rank run is resumed under 2)
    assert not state.exists()
    resumed = json.loads((tmp_path / "kd-curve.json").read_text())
    assert resumed[0] == epoch_one[0]  # epoch 1 was not trained again (its elapsed_s is kept)
    straight = json.loads((two_rank_student / "kd-curve.json").read_text())
    drop = lambda rows: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]  # noqa: E731
    assert drop(resumed) == drop(straight) and len(resumed) == 2
    a, b = _weights(tmp_path / "kd.pt"), _weights(two_rank_student / "kd.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_student_with_more_ranks_than_cores_is_one_line_before_anything_is_written(tmp_path, pipeline):
    cores = len(os.sched_getaffinity(0))
    params = write_params(
        tmp_path / "params.yaml",
        pipeline.params,
        student_train={"nproc": cores + 1, "batch_size": 8 * (cores + 1)},
    )
    out = tmp_path / "out"
    one_line_error(
        cli(params, *_student_args(pipeline, out, "ce", "ce")), "student_train.nproc", f"at most {cores}"
    )
    assert not out.exists()


def test_a_batch_size_the_ranks_cannot_share_is_one_line_before_anything_is_written(tmp_path, pipeline):
    params = write_params(
        tmp_path / "params.yaml", pipeline.params, student_train={"nproc": 2, "batch_size": 33}
    )
    out = tmp_path / "out"
    one_line_error(
        cli(params, *_student_args(pipeline, out, "ce", "ce")),
        "student_train.batch_size",
        "33",
        "not divisible by student_train.nproc 2",
        "multiple of 2",
    )
    assert not out.exists()


def test_a_student_run_in_a_job_of_another_size_than_nproc_is_refused_before_anything_is_written(
    tmp_path, pipeline
):
    """`student_train.nproc` is recorded with the student and its dvc dep: the job that trains it
    must have that many ranks (here: one process, nproc 2, as a torchrun of the wrong size)."""
    from pipeline.config import load_params
    from stages import student_train
    from storage.errors import SettingsError

    params = load_params(_student_params(tmp_path / "params.yaml", pipeline, 2))
    out = tmp_path / "out"
    with pytest.raises(SettingsError, match=r"student_train.nproc is 2, but this job has 1 process"):
        student_train.run(
            params.student_train.experiment("ce"),
            temperature_config=params.temperature,
            data_dir=pipeline.data,
            stores_dir=None,
            checkpoint_out=out / "ce.pt",
            metrics_out=out / "ce.json",
            curve_out=out / "ce-curve.json",
            device=torch.device("cpu"),
        )
    assert not out.exists()

"""The teacher dump under torchrun (DESIGN §6): gloo ranks on this CPU write the store that one
process writes, byte for byte; a dump killed under 2 ranks resumes under 1; a failed rank is one
line and the lock of a running job is respected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import StoreError, open_store
from tests.reliability.conftest import (
    CHUNK,
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
    ok(cli(params, *args))
    ranks_said = capfd.readouterr()  # the ranks' own stdout and stderr (child processes)
    assert ranks_said.out.count("teacher t: logits in") == 1 and "2 processes" in ranks_said.out
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
def test_a_two_rank_dump_of_a_store_another_job_writes_is_one_line_and_touches_nothing(
    tmp_path, pipeline, ranks_env
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
        started = time.monotonic()
        one_line_error(cli(params, *args), "another process is writing this output", str(out))
        assert time.monotonic() - started < 120
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


def test_check_params_refuses_more_dump_ranks_than_cores(tmp_path, pipeline):
    cores = len(os.sched_getaffinity(0))
    params = write_params(tmp_path / "params.yaml", pipeline.params, teacher_dump={"nproc": cores + 1})
    one_line_error(cli(params, "check-params"), "teacher_dump.nproc", f"at most {cores}")
    params = write_params(tmp_path / "params.yaml", pipeline.params, teacher_dump={"nproc": cores})
    ok(cli(params, "check-params"))

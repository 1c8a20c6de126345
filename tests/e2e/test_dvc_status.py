"""`dvc status` marks exactly the stages whose code or stores changed (DESIGN §8), on a copy of
the project whose dvc.lock records fake outputs (`dvc commit -f`): nothing is trained."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import copy_project
from tests.unit.test_dvc_deps import command_code

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}


def _stages(work: Path) -> dict[str, str]:
    """Stage name (`dvc.yaml:` prefix dropped) -> the `lessons` command it runs, as dvc resolves dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(work)) as repo:
        return {stage.addressing.split(":")[-1]: stage.cmd.split()[1] for stage in repo.index.stages}


def _changed(work: Path) -> set[str]:
    """Stages `dvc status` reports with changed deps."""
    from dvc.repo import Repo

    with Repo(str(work)) as repo:
        return {name.split(":")[-1] for name, changes in repo.status().items()
                if any(isinstance(c, dict) and "changed deps" in c for c in changes)}


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvc.repo import Repo

    work = tmp_path_factory.mktemp("status")
    copy_project(work)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    with Repo(str(work)) as repo:
        outs = [out.def_path for stage in repo.index.stages for out in stage.outs]
    for out in outs:  # a store or dataset is a folder, everything else a file
        path = work / out
        if path.suffix in ("", ".zarr"):
            path.mkdir(parents=True, exist_ok=True)
            (path / "part").write_text(out)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}" if path.suffix == ".json" else out)
    subprocess.run(["dvc", "commit", "-f", "-q"], cwd=work, env=ENV, check=True)
    assert _changed(work) == set()
    return work


def test_editing_a_module_marks_exactly_the_stages_whose_command_imports_it(committed):
    stages = _stages(committed)
    files = sorted({f for command in set(stages.values()) for f in command_code(command)}
                   | {"pipeline/__main__.py"})
    for rel in files:
        path = committed / rel
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        try:
            changed = _changed(committed)
        finally:
            path.write_bytes(original)
        assert changed == {name for name, command in stages.items() if rel in command_code(command)}, rel


def test_a_new_store_of_another_teacher_reruns_no_student(committed):
    imported = committed / "stores" / "big" / "logits.zarr"
    imported.mkdir(parents=True)
    (imported / "zarr.json").write_text("{}")
    try:
        changed = _changed(committed)
    finally:
        (imported / "zarr.json").unlink()
        imported.rmdir()
        imported.parent.rmdir()
    # Only the digest stages rerun (seconds); their files, and so the students, stay the same.
    assert changed == {name for name in _stages(committed) if name.startswith("store_digests@")}
    assert not any(name.startswith("student_train@") for name in changed)

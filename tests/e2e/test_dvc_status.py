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


def _changed_deps(work: Path) -> dict[str, set[str]]:
    """Stage -> the deps (as dvc.yaml writes them) that `dvc status` reports changed; stages with
    no changed dep are left out."""
    from dvc.repo import Repo

    with Repo(str(work)) as repo:
        found: dict[str, set[str]] = {}
        for name, changes in repo.status().items():
            for change in changes:
                if isinstance(change, dict) and "changed deps" in change:
                    found.setdefault(name.split(":")[-1], set()).update(change["changed deps"])
        return found


def _changed(work: Path) -> set[str]:
    """Stages `dvc status` reports with changed deps."""
    return set(_changed_deps(work))


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
    code = {command: command_code(command) for command in set(stages.values())}  # a tenth of a second each
    files = sorted(set().union(*code.values()) | {"pipeline/__main__.py"})
    # Every module edited at once and one `dvc status` (not one per module, a second each): it names
    # each changed dep of each stage, so a module marks the stages that list it (or a folder above
    # it), exactly as an edit of that module alone would.
    originals = {rel: (committed / rel).read_bytes() for rel in files}
    try:
        for rel, original in originals.items():
            (committed / rel).write_bytes(original + b"\n# edited\n")
        changed_deps = _changed_deps(committed)
    finally:
        for rel, original in originals.items():
            (committed / rel).write_bytes(original)
    for rel in files:
        changed = {
            name
            for name, deps in changed_deps.items()
            if any(rel == dep or rel.startswith(dep.rstrip("/") + "/") for dep in deps)
        }
        assert changed == {name for name, command in stages.items() if rel in code[command]}, rel
    assert _changed(committed) == set()  # restored: nothing marked


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

"""Every dvc.yaml stage lists exactly the code it runs and the params keys it reads (DESIGN §8).

Code: a stage's command is `lessons <command>`; what runs is `pipeline/cli.py` (its module-level
statements, the command's function and the cli helpers that function names, transitively) and,
through their imports, every in-repo module reached: a module's imports anywhere in its body
count (a function-level import runs when the function does), except under `if TYPE_CHECKING:`.
Importing `a.b` runs `a/__init__.py` too. The stage's code deps (the entries under pipeline/,
stages/, storage/ and nets/; a folder stands for every .py file in it) must equal that set: a
missing one is a stale result reported as up to date, an extra one a needless rerun.

Params: a stage reads a section through one variable per module (`config`, `temperature_config`,
...; the table `READS` names them). Every `<variable>.<field>` in those modules counts as a read of
that field, and the variable passed whole to `asdict`/`astuple`/`vars` counts as a read of every
field. The keys the stage lists in dvc.yaml (a bare section standing for all its fields) must
equal the keys read.
"""

from __future__ import annotations

import ast
import dataclasses
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import config as config_module

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages", "storage", "nets")
CLI = ROOT / "pipeline" / "cli.py"


def _dvc_stages() -> dict[str, dict[str, Any]]:
    """Stage name -> its template (the `do:` of a foreach; a matrix stage is its own template)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def _command(stage: dict[str, Any]) -> str:
    words = shlex.split(" ".join(stage["cmd"].split()))
    assert words[0] == "lessons", stage["cmd"]
    return words[1]


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """ast.walk, except the body of `if TYPE_CHECKING:` (never runs)."""
    yield node
    for field, value in ast.iter_fields(node):
        if _is_type_checking(node) and field == "body":
            continue
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                yield from _walk(child)


def _module_file(name: str) -> Path | None:
    """The in-repo file of module `name`, or None (a third-party module or a plain name)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def _imported(nodes: list[ast.AST]) -> set[str]:
    """Module names imported anywhere in `nodes` (`from m import n`: m, and m.n if a module)."""
    names: set[str] = set()
    for top in nodes:
        for node in _walk(top):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"relative import of {node.module}: use an absolute one"
                assert node.module is not None
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _closure(modules: set[str], *, entry: str | None = None) -> set[str]:
    """Repository-relative paths of every in-repo module that importing `modules` runs, plus
    `entry`'s file, whose imports are the caller's (`modules`) rather than its whole body's."""
    seen: set[str] = {entry} if entry else set()
    files: set[str] = {_module_file(entry).relative_to(ROOT).as_posix()} if entry else set()
    queue = list(modules)
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        queue.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        path = _module_file(name)
        if path is None:
            continue
        files.add(path.relative_to(ROOT).as_posix())
        queue.extend(_imported([ast.parse(path.read_text(), str(path))]))
    return files


def _command_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """`lessons` command name -> its function in pipeline/cli.py."""
    commands = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and isinstance(decorator.func, ast.Attribute)
                    and decorator.func.attr == "command"
                    and decorator.args
                ):
                    commands[decorator.args[0].value] = node
    return commands


def command_code(command: str) -> set[str]:
    """The in-repo files `lessons <command>` runs (see the module docstring)."""
    tree = ast.parse(CLI.read_text(), str(CLI))
    definitions = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    top_level = [node for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    reached: list[ast.AST] = []
    queue: list[ast.AST] = [_command_functions(tree)[command]]
    while queue:
        node = queue.pop()
        if node in reached:
            continue
        reached.append(node)
        queue.extend(
            definitions[name.id]
            for name in _walk(node)
            if isinstance(name, ast.Name) and name.id in definitions
        )
    return _closure(_imported(top_level + reached) | {"pipeline"}, entry="pipeline.cli")


def listed_code(deps: list[str]) -> set[str]:
    """The code entries of a stage's deps, a folder expanded to its .py files."""
    files: set[str] = set()
    for dep in deps:
        if dep.split("/")[0] not in PACKAGES:
            continue
        path = ROOT / dep
        assert path.exists(), f"dep {dep} does not exist"
        files.update(
            p.relative_to(ROOT).as_posix() for p in path.rglob("*.py")
        ) if path.is_dir() else files.add(dep)
    return files


@pytest.mark.parametrize("stage", sorted(_dvc_stages()))
def test_each_stage_lists_exactly_the_code_its_command_imports(stage):
    definition = _dvc_stages()[stage]
    expected = command_code(_command(definition))
    listed = listed_code(definition.get("deps", []))
    assert listed == expected, (
        f"{stage}: missing {sorted(expected - listed)}, extra {sorted(listed - expected)}"
    )


# --- params ---------------------------------------------------------------------------------

C = config_module
SHARED = {f.name for f in dataclasses.fields(C.StudentTrainConfig)}
EXPERIMENT = "student_train.experiments.${item.experiment}"


def _resolved_keys(field: str) -> set[str]:
    """params keys behind a ResolvedExperiment field: the experiment's own value, else the shared one."""
    keys = (
        {f"{EXPERIMENT}.{field}"}
        if field in {f.name for f in dataclasses.fields(C.ExperimentConfig)}
        else set()
    )
    return keys | ({f"student_train.{field}"} if field in SHARED else set())  # name, seed: cmd arguments


def _section(prefix: str) -> Any:
    return lambda field: {f"{prefix}.{field}"}


# Where each stage reads a params section: (file, function in it or None for the whole module,
# variable, dataclass of the variable, params keys of one field).
READS: dict[str, list[tuple[str, str | None, str, type, Any]]] = {
    "prepare_data": [
        (
            "pipeline/cli.py",
            "prepare_data_command",
            "params",
            C.Params,
            lambda f: set(),
        ),  # sections passed whole
        ("stages/prepare_data.py", None, "config", C.PrepareDataConfig, _section("prepare_data")),
        ("stages/prepare_data.py", None, "data_config", C.DataConfig, _section("data")),
        ("pipeline/datasets/__init__.py", None, "config", C.DataConfig, _section("data")),
    ],
    "teacher_train": [
        (
            "pipeline/cli.py",
            "teacher_train_command",
            "config",
            C.TeacherConfig,
            _section("teacher_train.teachers.${key}"),
        ),
        (
            "stages/teacher_train.py",
            None,
            "config",
            C.TeacherConfig,
            _section("teacher_train.teachers.${key}"),
        ),
    ],
    "teacher_dump": [
        ("pipeline/cli.py", "teacher_dump_command", "config", C.TeacherDumpConfig, _section("teacher_dump")),
        ("stages/teacher_dump.py", None, "config", C.TeacherDumpConfig, _section("teacher_dump")),
    ],
    "adjust": [("stages/adjust.py", None, "config", C.AdjustConfig, _section("adjust"))],
    "temperature": [("stages/temperature.py", None, "config", C.TemperatureConfig, _section("temperature"))],
    "store_digests": [
        ("pipeline/cli.py", "store_digests_command", "resolved", C.ResolvedExperiment, lambda f: set()),
        ("stages/store_digests.py", None, "experiment", C.ResolvedExperiment, _resolved_keys),
    ],
    "student_train": [
        ("pipeline/cli.py", "student_train_command", "resolved", C.ResolvedExperiment, _resolved_keys),
        ("pipeline/cli.py", "student_train_command", "params.adjust", C.AdjustConfig, _section("adjust")),
        ("stages/student_train.py", None, "experiment", C.ResolvedExperiment, _resolved_keys),
        ("stages/student_train.py", None, "temperature_config", C.TemperatureConfig, _section("temperature")),
    ],
    "report": [
        ("pipeline/cli.py", "report_command", "params", C.Params, lambda f: set()),
        ("pipeline/cli.py", "report_command", "params.data", C.DataConfig, _section("data")),
        (
            "pipeline/cli.py",
            "report_command",
            "params.teacher_train",
            C.TeacherTrainConfig,
            _section("teacher_train"),
        ),
        ("pipeline/cli.py", "report_command", "params.adjust", C.AdjustConfig, _section("adjust")),
        (
            "pipeline/cli.py",
            "report_command",
            "params.student_train",
            C.StudentTrainConfig,
            _section("student_train"),
        ),
        ("stages/report.py", None, "config", C.ReportConfig, _section("report")),
    ],
}
# Methods of a config that read fields of it (a call counts as reading them).
METHOD_READS: dict[tuple[type, str], set[str]] = {(C.StudentTrainConfig, "runs"): {"experiments", "seeds"}}
# Listed whole although a stage reads part of it: dvc refuses a listed key that params.yaml does
# not set, and an experiment sets only some of its keys.
WHOLE_ENTRY = {("store_digests", EXPERIMENT)}
WHOLE = {
    "data": C.DataConfig,
    "prepare_data": C.PrepareDataConfig,
    "teacher_dump": C.TeacherDumpConfig,
    "teacher_train.teachers.${key}": C.TeacherConfig,
    "adjust": C.AdjustConfig,
    "temperature": C.TemperatureConfig,
    "report": C.ReportConfig,
    EXPERIMENT: C.ExperimentConfig,
}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def fields_read(source: ast.AST, variable: str, cls: type) -> set[str]:
    """Fields of `cls` read through `variable` in `source`: `variable.field`, or every field when
    the variable is formatted or passed to asdict/astuple/vars/repr/str whole."""
    names = {f.name for f in dataclasses.fields(cls)}
    read: set[str] = set()
    for node in _walk(source):
        if isinstance(node, ast.Attribute) and _dotted(node.value) == variable:
            if node.attr in names:
                read.add(node.attr)
            read |= METHOD_READS.get((cls, node.attr), set())
        whole = (isinstance(node, ast.FormattedValue) and _dotted(node.value) == variable) or (
            isinstance(node, ast.Call)
            and (_dotted(node.func) or "").split(".")[-1] in {"asdict", "astuple", "vars", "repr", "str"}
            and any(_dotted(a) == variable for a in node.args)
        )
        if whole:
            read |= names
    return read


# Keys that choose where a stage runs, not what it writes: the output is byte-identical whatever
# their value (tests/reliability/test_distributed.py for nproc, tests/unit/test_ka_dtd_stages.py
# for a dask.distributed scheduler), so changing one must not rerun the stage: never listed.
WHERE_ONLY = {"teacher_dump.nproc", "adjust.scheduler", "temperature.scheduler"}


def params_read(stage: str) -> set[str]:
    keys: set[str] = set()
    for file, function, variable, cls, key_of in READS[stage]:
        tree = ast.parse((ROOT / file).read_text())
        source = next(n for n in tree.body if getattr(n, "name", None) == function) if function else tree
        for field in fields_read(source, variable, cls):
            keys |= key_of(field)
    return keys - WHERE_ONLY


def params_listed(stage: str) -> set[str]:
    keys: set[str] = set()
    for entry in _dvc_stages()[stage].get("params", []):
        assert isinstance(entry, str), f"{stage}: {entry!r}: list keys of params.yaml only"
        keys |= {f"{entry}.{f.name}" for f in dataclasses.fields(WHOLE[entry])} if entry in WHOLE else {entry}
    return keys


@pytest.mark.parametrize("stage", sorted(READS))
def test_each_stage_lists_exactly_the_params_keys_it_reads(stage):
    read, listed = params_read(stage), params_listed(stage)
    for whole_stage, entry in WHOLE_ENTRY:
        if whole_stage == stage:
            read |= {key for key in listed if key.startswith(entry + ".")}
    assert listed == read, f"{stage}: missing {sorted(read - listed)}, extra {sorted(listed - read)}"


def test_every_stage_with_params_is_checked_and_check_params_reads_the_whole_file():
    stages = _dvc_stages()
    assert {name for name, stage in stages.items() if stage.get("params")} == set(READS)
    assert "params.yaml" in stages["check_params"]["deps"]


def test_a_student_reads_the_temperature_keys_of_its_loss_and_not_the_histogram_bins():
    assert params_read("student_train") & {
        f"temperature.{f.name}" for f in dataclasses.fields(C.TemperatureConfig)
    } == {
        "temperature.base_temperature",
        "temperature.beta",
        "temperature.gamma",
        "temperature.min_temperature",
        "temperature.max_temperature",
    }


# --- stores: a student depends on the stores it reads, not on the whole stores/ folder -------


@pytest.fixture(scope="module")
def resolved() -> dict[str, list[str]]:
    """dvc's own resolution of dvc.yaml + params.yaml: stage name -> deps paths."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {stage.addressing: [dep.def_path for dep in stage.deps] for stage in repo.index.stages}


def test_a_student_depends_on_no_store_folder_only_on_the_digest_of_the_stores_it_reads(resolved):
    experiments = yaml.safe_load((ROOT / "params.yaml").read_text())["student_train"]["experiments"]
    students = {name: deps for name, deps in resolved.items() if name.startswith("student_train@")}
    assert len(students) == len(experiments) * len(
        yaml.safe_load((ROOT / "params.yaml").read_text())["student_train"]["seeds"]
    )
    for name, deps in students.items():
        experiment = name.split("@")[1].rsplit("-", 1)[0]
        assert [d for d in deps if d.split("/")[0] in ("stores", "digests")] == [f"digests/{experiment}.json"]
    for experiment in experiments:  # the digest stage reads the stores (and reruns in seconds)
        assert "stores" in resolved[f"store_digests@{experiment}"]


@pytest.mark.parametrize(
    "params_file",
    ["params.yaml", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("params/*.yaml"))],
)
def test_every_params_key_a_stage_lists_is_set_in_params_yaml_and_in_each_preset(params_file):
    """dvc refuses to run a stage whose listed key the params file does not set, so a key listed
    one by one (teacher_dump's, to leave out `nproc`) must be written in every file users run."""
    content = yaml.safe_load((ROOT / params_file).read_text())
    missing = []
    for stage in _dvc_stages().values():
        for entry in stage.get("params", []):
            if "${" in entry:
                continue
            node: Any = content
            for part in entry.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(entry)
                    break
                node = node[part]
    assert not missing, f"{params_file} does not set {sorted(set(missing))}"

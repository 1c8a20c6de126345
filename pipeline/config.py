"""Typed, strict configuration: `load_params` reads `params.yaml` into `Params`.

One frozen dataclass per section (`pipeline.sections`; `student_train` in `pipeline.experiments`),
re-exported here, so `from pipeline.config import TemperatureConfig` is the one import path. The
loader refuses unknown keys, missing required keys and values of the wrong type with a
`ConfigError` that names the section and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.experiments import OVERRIDABLE, ExperimentConfig, ResolvedExperiment, StudentTrainConfig
from pipeline.sections import (
    BETA_LIMIT,
    GAMMA_LIMIT,
    LOGIT_LIMIT,
    TEMPERATURE_RANGE,
    AdjustConfig,
    AdjustMethod,
    ConfigError,
    DataConfig,
    Device,
    DtdMode,
    EnsembleCombine,
    EnsembleConfig,
    EnsembleSpec,
    KdLoss,
    PrepareDataConfig,
    ReportConfig,
    TeacherConfig,
    TeacherDumpConfig,
    TeacherTrainConfig,
    TemperatureConfig,
    check_temperature,
)

__all__ = [
    "BETA_LIMIT",
    "GAMMA_LIMIT",
    "LOGIT_LIMIT",
    "OVERRIDABLE",
    "TEMPERATURE_RANGE",
    "AdjustConfig",
    "AdjustMethod",
    "ConfigError",
    "DataConfig",
    "Device",
    "DtdMode",
    "EnsembleCombine",
    "EnsembleConfig",
    "EnsembleSpec",
    "ExperimentConfig",
    "KdLoss",
    "Params",
    "PrepareDataConfig",
    "ReportConfig",
    "ResolvedExperiment",
    "StudentTrainConfig",
    "TeacherConfig",
    "TeacherDumpConfig",
    "TeacherTrainConfig",
    "TemperatureConfig",
    "check_temperature",
    "from_dict",
    "load_params",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    """The whole `params.yaml`."""

    data: DataConfig = field(default_factory=DataConfig)
    prepare_data: PrepareDataConfig = field(default_factory=PrepareDataConfig)
    teacher_train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    teacher_dump: TeacherDumpConfig = field(default_factory=TeacherDumpConfig)
    adjust: AdjustConfig = field(default_factory=AdjustConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    student_train: StudentTrainConfig = field(default_factory=StudentTrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def check_pipeline(self, known_archs: Iterable[str] | None = None) -> list[str]:
        """Cross-section checks of the whole pipeline, beyond each section's own.

        Every experiment resolves; a KD experiment names a defined teacher and an
        `adjust` method that `adjust.methods` builds; every architecture is known (when
        `known_archs` is given). Returns the experiment names, in order.
        Raises:
            ConfigError: the first problem found, naming the key.
        """
        archs = sorted(known_archs) if known_archs is not None else None

        def check_arch(arch: str, where: str) -> None:
            if archs is not None and arch not in archs:
                raise ConfigError(f"{where}: unknown architecture {arch!r}; known: {', '.join(archs)}")

        for name, teacher in self.teacher_train.teachers.items():
            check_arch(teacher.arch, f"teacher_train.teachers.{name}.arch")
        self.check_ensembles()
        for name in self.student_train.experiments:
            exp = self.student_train.experiment(name)  # seeds change nothing else; all were checked
            if exp.kd and exp.teacher not in (*self.teacher_train.teachers, *self.ensemble.ensembles):
                raise ConfigError(
                    f"student_train.experiments.{name}.teacher: no teacher named {exp.teacher!r} in "
                    f"teacher_train.teachers (known: {', '.join(self.teacher_train.teachers)}) or "
                    f"ensemble.ensembles (known: {', '.join(self.ensemble.ensembles) or 'none'})"
                )
            if exp.kd and exp.teacher_mode == "online" and exp.teacher in self.ensemble.ensembles:
                raise ConfigError(
                    f"student_train.experiments.{name}.teacher_mode: online runs one teacher "
                    f"checkpoint, but {exp.teacher!r} is an ensemble (ensemble.ensembles); use "
                    "teacher_mode: offline"
                )
            offline = exp.kd and exp.teacher_mode == "offline"  # an online student reads no KA store
            if offline and exp.adjust != "none" and exp.adjust not in self.adjust.methods:
                raise ConfigError(
                    f"student_train.experiments.{name}.adjust: {exp.adjust!r} is not in "
                    f"adjust.methods {list(self.adjust.methods)}; add it there"
                )
            check_arch(exp.arch, f"student_train.experiments.{name}")
            dump = self.teacher_dump
            if offline and dump.views != "none" and not exp.augment:
                raise ConfigError(
                    f"student_train.augment: false, but teacher_dump.views: {dump.views} stores views "
                    f"that only an augmenting student reads (experiment {name}); set "
                    "student_train.augment: true, or teacher_dump.views: none"
                )
            if offline and dump.layout == "topk" and exp.loss != "kd":
                raise ConfigError(
                    f"student_train.experiments.{name}.loss: {exp.loss} needs every teacher logit, "
                    "and teacher_dump.layout: topk keeps the top-k; use loss: kd with top-k stores, "
                    "or teacher_dump.layout: dense"
                )
            if offline and dump.views == "scheduled" and exp.augment:
                missing = sorted(set(self.student_train.seeds) - set(dump.seeds))
                if missing or exp.epochs > dump.epochs:
                    raise ConfigError(
                        f"teacher_dump.seeds/epochs: the scheduled store holds seeds {list(dump.seeds)} × "
                        f"{dump.epochs} epochs, but experiment {name} runs seeds "
                        f"{list(self.student_train.seeds)} × "
                        f"{exp.epochs} epochs; list every student seed in teacher_dump.seeds and set "
                        "teacher_dump.epochs to the longest student run, or use views: all"
                    )
        return list(self.student_train.experiments)

    def check_ensembles(self) -> None:
        """Every ensemble combines teachers of `teacher_train.teachers` and is not named like one.

        Raises:
            ConfigError: naming the ensemble and the teacher at fault.
        """
        for name, spec in self.ensemble.ensembles.items():
            if name in self.teacher_train.teachers:
                raise ConfigError(
                    f"ensemble.ensembles.{name}: a teacher of teacher_train.teachers has that name "
                    "(both would write stores/<name>/); rename the ensemble"
                )
            for teacher in spec.teachers:
                if teacher not in self.teacher_train.teachers:
                    raise ConfigError(
                        f"ensemble.ensembles.{name}.teachers: no teacher named {teacher!r} in "
                        f"teacher_train.teachers (known: {', '.join(self.teacher_train.teachers)})"
                    )

    def teacher_names(self) -> list[str]:
        """The names an experiment's `teacher` may take: the teachers, then the ensembles."""
        return [*self.teacher_train.teachers, *self.ensemble.ensembles]


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_DECIMAL = re.compile(r"([-+]?)(\d*)(?:\.(\d*))?(?:[eE]([-+]?)(\d+))?")


def _as_yaml(value: Any) -> str:
    """`value` as params.yaml spells it (null, true, false; text quoted), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _yaml_number_spelling(text: str) -> str | None:
    """How to write `text` so that PyYAML (YAML 1.1) reads it as a float, or None when Python's
    float() does not read a finite number in it either.

    YAML 1.1 floats need a dot in the mantissa and a sign in the exponent: `1.0e30` and `1e-3`
    are strings to it (but floats to YAML 1.2 and to DVC); `1.0e+30` and `1.0e-3` are floats.
    """
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    match = _DECIMAL.fullmatch(text.strip().replace("_", ""))
    if match is None or not (match.group(2) or match.group(3)):  # hex, "inf"-like, or "." alone
        match = _DECIMAL.fullmatch(repr(number))
        assert match is not None  # repr of a finite float is always decimal
    sign, whole, fraction, exponent_sign, exponent = match.groups()
    spelling = f"{sign}{whole or '0'}.{fraction or '0'}"
    if exponent is not None:
        spelling += f"e{exponent_sign or '+'}{exponent}"
    return spelling if yaml.safe_load(spelling) == number else None  # never suggest another value


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the type `hint` and convert containers; raise ConfigError if off."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: must not be null")
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() not in args:
            # YAML 1.1 reads a bare off/on/no/yes as a boolean; DVC (YAML 1.2) reads a string.
            value = {False: "off", True: "on"}[value] if ("off" in args or "on" in args) else value
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {_as_yaml(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {_as_yaml(value)}")
        item_hint = args[0]
        return tuple(_convert(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: must be a mapping, got {_as_yaml(value)}")
        key_hint, item_hint = args
        return {
            _convert(k, key_hint, where): _convert(v, item_hint, f"{where}.{k}") for k, v in value.items()
        }
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {_as_yaml(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {_as_yaml(value)}")
        return value
    if hint is float:
        if isinstance(value, str) and (spelling := _yaml_number_spelling(value)) is not None:
            raise ConfigError(
                f"{where}: YAML read {value!r} as text, not a number (YAML 1.1 wants a dot in "
                f"the mantissa and a sign in the exponent, and no quotes); write {spelling}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {_as_yaml(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):  # .nan and .inf are YAML numbers, and no knob means them
            raise ConfigError(f"{where}: must be a finite number, got {_as_yaml(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {_as_yaml(value)}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug in this module


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, strictly (unknown/missing keys raise ConfigError)."""
    label = where or "params.yaml"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(fields)})"
        raise ConfigError(f"{label}: unknown key {key!r}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{label}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # An entry of a named mapping (teacher_train.teachers.<name>, ensemble.ensembles.<name>)
        # checks itself without knowing its name: put the name into the key its message names.
        generic, text = where.rpartition(".")[0] + ".", str(exc)
        if where.count(".") >= 2 and text.startswith(generic) and not text.startswith(where):
            raise ConfigError(f"{where}.{text[len(generic) :]}") from exc
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc}") from exc


def load_params(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> Params:
    """Read and validate `params.yaml`.

    Args:
        path: the YAML file.
        overrides: optional `{"section.key": value}` applied after reading (dotted paths).
    Raises:
        ConfigError: the file is missing, not YAML, or any section fails validation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the parameters file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
            "save the parameters file as UTF-8"
        ) from exc
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
        raw = {} if raw is None else raw
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}; fix that line") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return from_dict(Params, raw, "")

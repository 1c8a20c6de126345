"""Typed, strict configuration: one frozen dataclass per `params.yaml` section.

Defaults live here and only here. `load_params` refuses unknown keys, missing required keys and
values of the wrong type with a `ConfigError` that names the section and key.
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
from typing import Any, ClassVar, Literal

import yaml

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]


class ConfigError(ValueError):
    """A `params.yaml` section or key is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class DataConfig:
    """Section `data`: which dataset, where it lives, which subset."""

    name: str = "fashion_mnist"
    root: str | None = None  # None = the dataset's default root (see pipeline.datasets)
    max_train_samples: int | None = None  # None = all; else a class-balanced, seeded subset
    max_test_samples: int | None = None
    # A stratified, seeded share of the train split (after max_train_samples) held out as a `val`
    # split: the teacher and students never train on it and report val_top1 beside test_top1.
    validation_fraction: float = 0.0  # in [0, 1); 0.0 = no validation split
    seed: int = 0

    def __post_init__(self) -> None:
        _check_seed(self.seed, "data.seed")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction: must lie in [0, 1) (0.0 = no validation split), "
                              f"got {self.validation_fraction}; e.g. 0.1 holds out 10% of each class")
        for key in ("max_train_samples", "max_test_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"data.{key}: must be null or a positive integer, got {value}")


@dataclass(frozen=True)
class PrepareDataConfig:
    """Section `prepare_data`: writing the FFCV betons."""

    num_workers: int = 2

    def __post_init__(self) -> None:
        _positive(self, "prepare_data", ("num_workers",))


@dataclass(frozen=True)
class TeacherConfig:
    """One entry of `teacher_train.teachers`: a teacher trained with cross-entropy, or loaded."""

    arch: str
    checkpoint: str | None = None  # a given checkpoint file skips training
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the run, for `step`
    gamma: float = 0.1  # lr factor at each milestone, for `step`
    augment: bool = True  # pad-4 crop + flip for 32x32 data, flip only otherwise
    seed: int = 0
    device: Device = "auto"

    def __post_init__(self) -> None:
        _positive(self, "teacher_train.teachers", ("epochs", "batch_size", "lr"))
        _check_optimizer(self, "teacher_train.teachers")
        _check_seed(self.seed, "teacher_train.teachers.seed")
        _check_schedule(self, "teacher_train.teachers")


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Section `teacher_train`: every teacher, by name."""

    teachers: dict[str, TeacherConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.teachers:
            if name.endswith(("-config", "-curve")):  # metrics/teachers/<name>-config.json is a record
                raise ConfigError(f"teacher_train.teachers.{name}: a teacher name must not end in -config or "
                                  "-curve (names of the files beside each teacher's metrics); rename it")

    def teacher(self, name: str) -> TeacherConfig:
        if name not in self.teachers:
            raise ConfigError(
                f"teacher_train.teachers: no teacher named {name!r}; known: {sorted(self.teachers)}"
            )
        return self.teachers[name]


@dataclass(frozen=True)
class TeacherDumpConfig:
    """Section `teacher_dump`: the one teacher forward pass that fills the logit store."""

    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = 1024
    chunk_size: int = 16384  # rows of N per zarr chunk (one chunk = one unit of resume)
    device: Device = "auto"

    def __post_init__(self) -> None:
        _positive(self, "teacher_dump", ("batch_size", "chunk_size"))
        if self.chunk_size % self.batch_size:
            raise ConfigError(
                f"teacher_dump.chunk_size: must be a multiple of batch_size ({self.batch_size}) so "
                f"a resumed dump is byte-identical, got {self.chunk_size}"
            )


@dataclass(frozen=True)
class AdjustConfig:
    """Section `adjust` (Knowledge Adjustment, arXiv:1911.07471 §3.1)."""

    methods: tuple[Literal["ps", "lsr", "none"], ...] = ("ps", "lsr")
    epsilon: float = 0.1  # LSR smoothing mass, in (0, 1)

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon < 1.0:
            raise ConfigError(f"adjust.epsilon: must lie in (0, 1), got {self.epsilon}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"adjust.methods: each method once, got {list(self.methods)}")


# Where the KD loss L = (1−α)·CE + α·τ²·KL(q ‖ p^τ) (stages/functional.py) and its gradient are
# finite in float32 (measured with adversarial rows: student max where the teacher is min).
# With float16-max logits (±65504) the hard float32 limits are τ ≈ 3.85e-34 (below, logits/τ
# overflows) and τ ≈ 1.84e19 (above, τ² overflows); both give NaN just outside. The range kept
# here is far inside both: at 1e-4 and 1e4 the loss stays finite for |logits| up to LOGIT_LIMIT,
# so for any float16 store and any float32 logits a real net produces. Above 1e4 float32
# rounding swamps τ²·KL (100 classes: the loss is 9% off at 1e4, −115 instead of 24.9 at 1e5);
# below 1e-4 a target is one-hot already for any logit gap above 0.01 (e^-100), so a smaller τ
# changes nothing but moves the overflow towards real logits.
TEMPERATURE_RANGE = (1e-4, 1e4)
LOGIT_LIMIT = 1e33  # |logit| up to which the KD loss is finite at both ends of TEMPERATURE_RANGE
BETA_LIMIT = 1e38  # |β| below float32's max (3.4e38): a β that rounds to inf makes 0·β = NaN
GAMMA_LIMIT = 64.0  # FLSW weights (1 − cos)^γ <= 2^γ and their batch sum stay finite in float32


@dataclass(frozen=True)
class TemperatureConfig:
    """Section `temperature` (Dynamic Temperature Distillation, arXiv:1911.07471 §3.2).

    Ranges (each checked on load, one line naming the key): min_temperature, base_temperature
    and max_temperature lie in TEMPERATURE_RANGE = [1e-4, 1e4] with min <= base <= max, the
    range where the KD loss is finite in float32 for any float16 logits (see above); |beta| <=
    1e38 (finite in float32; the clamp keeps every τ_x in [min, max] whatever β); 0 <= gamma
    <= 64. A student's `fixed_target_temperature` lies in the same range.
    """

    temperature_range: ClassVar[tuple[float, float]] = TEMPERATURE_RANGE
    logit_limit: ClassVar[float] = LOGIT_LIMIT

    base_temperature: float = 4.0  # tau_0
    beta: float = 1.0  # temperature change per unit of weight above/below the mean
    gamma: float = 1.0  # FLSW exponent
    min_temperature: float = 1.0
    max_temperature: float = 8.0
    histogram_bins: int = 40

    def __post_init__(self) -> None:
        if not 0.0 < self.min_temperature <= self.base_temperature <= self.max_temperature:
            raise ConfigError(
                "temperature: need 0 < min_temperature <= base_temperature <= max_temperature, each in "
                f"[{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}], got "
                f"{self.min_temperature}, {self.base_temperature}, {self.max_temperature}"
            )
        for key in ("min_temperature", "max_temperature", "base_temperature"):
            check_temperature(getattr(self, key), f"temperature.{key}")
        _positive(self, "temperature", ("histogram_bins",))
        if not abs(self.beta) <= BETA_LIMIT:
            raise ConfigError(f"temperature.beta: must lie in [-{BETA_LIMIT:g}, {BETA_LIMIT:g}] (beyond, it "
                              f"is inf in float32 and 0·beta is NaN), got {self.beta:g}; the clamp to "
                              "[min_temperature, max_temperature] already bounds every τ, so a smaller "
                              "beta loses nothing")
        if not self.gamma >= 0.0:
            raise ConfigError(f"temperature.gamma: the FLSW exponent must be >= 0, got {self.gamma}")
        if not self.gamma <= GAMMA_LIMIT:
            raise ConfigError(f"temperature.gamma: the FLSW exponent must be <= {GAMMA_LIMIT:g} (the weights "
                              f"(1 - cos)^gamma reach 2^gamma), got {self.gamma:g}; use e.g. 1 or 2")


def check_temperature(value: float, where: str) -> None:
    """Refuse a temperature outside TEMPERATURE_RANGE with one line naming `where` and the fix.

    Raises:
        ConfigError: `value` < 1e-4 or > 1e4 (or NaN).
    """
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:
        fix = f"raise it to at least {low:g}" if value < high else f"lower it to at most {high:g}"
        raise ConfigError(f"{where}: must lie in [{low:g}, {high:g}], where the KD loss is finite in float32 "
                          f"for any float16 logits, got {value:g}; {fix}")


@dataclass(frozen=True)
class ExperimentConfig:
    """One student experiment. Unset (null) fields fall back to `student_train` defaults."""

    teacher: str | None = None
    kd: bool = True
    adjust: Literal["ps", "lsr", "none"] = "none"
    dtd: Literal["off", "static", "flsw", "cwsm"] = "off"
    arch: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    alpha: float | None = None
    # KA-LSR rows: null = soften the student by the row's τ and weight by τ² (DESIGN §4); a
    # number = use this τ instead on fixed-target rows only (1.0: unsoftened student, weight 1).
    fixed_target_temperature: float | None = None


#: `student_train` keys an experiment may set for itself (null = the shared value).
OVERRIDABLE = ("arch", "epochs", "batch_size", "lr", "alpha")


@dataclass(frozen=True)
class StudentTrainConfig:
    """Section `student_train`: shared student settings plus the experiment matrix."""

    arch: str = "cnn_tiny"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the run, for `step`
    gamma: float = 0.1  # lr factor at each milestone, for `step`
    alpha: float = 0.9  # weight of the KD term; (1 - alpha) on cross-entropy
    seeds: tuple[int, ...] = (0,)  # every experiment runs once per seed (a dvc matrix axis)
    augment: bool = True
    num_workers: int = 2
    device: Device = "auto"
    experiments: dict[str, ExperimentConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive(self, "student_train", ("epochs", "batch_size", "lr", "num_workers"))
        _check_optimizer(self, "student_train")
        _check_schedule(self, "student_train")
        for name, exp in self.experiments.items():
            _positive(exp, f"student_train.experiments.{name}", ("epochs", "batch_size", "lr"))
            if exp.alpha is not None and not 0.0 <= exp.alpha <= 1.0:
                raise ConfigError(f"student_train.experiments.{name}.alpha: must lie in [0, 1], got {exp.alpha}")
            value = exp.fixed_target_temperature
            if value is not None and (exp.adjust != "lsr" or not (value > 0 and math.isfinite(value))):
                raise ConfigError(
                    f"student_train.experiments.{name}.fixed_target_temperature: a positive number, and "
                    f"only with adjust: lsr (got {value}, adjust={exp.adjust})")
            if value is not None:
                check_temperature(value, f"student_train.experiments.{name}.fixed_target_temperature")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"student_train.seeds: must be a non-empty list of distinct integers, "
                              f"got {list(self.seeds)}")
        for seed in self.seeds:
            _check_seed(seed, "student_train.seeds")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"student_train.alpha: must lie in [0, 1], got {self.alpha}")

    def runs(self) -> list[tuple[str, int]]:
        """Every configured (experiment, seed) pair, experiment-major in params.yaml order: the
        `student_train` matrix of dvc.yaml, which the report shows and nothing else."""
        return [(name, seed) for name in self.experiments for seed in self.seeds]

    def overrides(self, name: str) -> dict[str, Any]:
        """The shared keys (`OVERRIDABLE`) that experiment `name` sets itself, with its values."""
        exp = self.experiment_config(name)
        return {key: getattr(exp, key) for key in OVERRIDABLE if getattr(exp, key) is not None}

    def experiment_config(self, name: str) -> ExperimentConfig:
        """The entry `name` of `experiments` as written (unset fields None)."""
        if name not in self.experiments:
            raise ConfigError(
                f"student_train.experiments: no experiment named {name!r}; "
                f"known: {sorted(self.experiments)}"
            )
        return self.experiments[name]

    def experiment(self, name: str, seed: int | None = None) -> ResolvedExperiment:
        """The experiment `name` (for `seed`, default the first of `seeds`) with every unset
        field filled from the shared defaults."""
        exp = self.experiment_config(name)
        if exp.kd and exp.teacher is None:
            raise ConfigError(f"student_train.experiments.{name}.teacher: required when kd is true")
        if not exp.kd and (exp.adjust != "none" or exp.dtd != "off"):
            raise ConfigError(
                f"student_train.experiments.{name}: adjust/dtd need kd: true "
                f"(got adjust={exp.adjust}, dtd={exp.dtd})"
            )
        pick = lambda key: getattr(self, key) if getattr(exp, key) is None else getattr(exp, key)  # noqa: E731
        resolved = ResolvedExperiment(
            name=name, teacher=exp.teacher, kd=exp.kd, adjust=exp.adjust, dtd=exp.dtd,
            fixed_target_temperature=exp.fixed_target_temperature,
            arch=pick("arch"), epochs=pick("epochs"), batch_size=pick("batch_size"), lr=pick("lr"),
            alpha=pick("alpha"), seed=self.seeds[0] if seed is None else seed, momentum=self.momentum,
            weight_decay=self.weight_decay, schedule=self.schedule, milestones=self.milestones,
            gamma=self.gamma, augment=self.augment, num_workers=self.num_workers, device=self.device,
        )
        return resolved  # every field was checked on load (shared values and overrides alike)


@dataclass(frozen=True)
class ResolvedExperiment:
    """A student experiment with shared defaults applied (what `student_train.run` receives)."""

    name: str
    teacher: str | None
    kd: bool
    adjust: Literal["ps", "lsr", "none"]
    dtd: Literal["off", "static", "flsw", "cwsm"]
    fixed_target_temperature: float | None
    arch: str
    epochs: int
    batch_size: int
    lr: float
    alpha: float
    seed: int
    momentum: float
    weight_decay: float
    schedule: Literal["cosine", "step"]
    milestones: tuple[float, ...]
    gamma: float
    augment: bool
    num_workers: int
    device: Device


@dataclass(frozen=True)
class ReportConfig:
    """Section `report`: the summary table and plots."""

    baseline: str = "ce"  # experiment the Δ column is measured against
    kd_baseline: str = "kd"


@dataclass(frozen=True)
class Params:
    """The whole `params.yaml`."""

    data: DataConfig = field(default_factory=DataConfig)
    prepare_data: PrepareDataConfig = field(default_factory=PrepareDataConfig)
    teacher_train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    teacher_dump: TeacherDumpConfig = field(default_factory=TeacherDumpConfig)
    adjust: AdjustConfig = field(default_factory=AdjustConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
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
        for name in self.student_train.experiments:
            exp = self.student_train.experiment(name)  # seeds change nothing else; all were checked
            if exp.kd and exp.teacher not in self.teacher_train.teachers:
                raise ConfigError(f"student_train.experiments.{name}.teacher: no teacher named {exp.teacher!r} in "
                                  f"teacher_train.teachers (known: {', '.join(self.teacher_train.teachers)})")
            if exp.kd and exp.adjust != "none" and exp.adjust not in self.adjust.methods:
                raise ConfigError(f"student_train.experiments.{name}.adjust: {exp.adjust!r} is not in "
                                  f"adjust.methods {list(self.adjust.methods)}; add it there")
            check_arch(exp.arch, f"student_train.experiments.{name}")
        return list(self.student_train.experiments)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                    "keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_seed(seed: int, where: str) -> None:
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{where}: a seed must lie in [0, 2^32), got {seed}")


def _check_optimizer(obj: Any, section: str) -> None:
    """SGD settings: momentum in [0, 1), weight_decay >= 0."""
    if not 0.0 <= obj.momentum < 1.0:
        raise ConfigError(f"{section}.momentum: must lie in [0, 1), got {obj.momentum}")
    if not obj.weight_decay >= 0.0:
        raise ConfigError(f"{section}.weight_decay: must be >= 0, got {obj.weight_decay}")


def _check_schedule(obj: Any, section: str) -> None:
    """`milestones` are increasing fractions of the run in (0, 1); `gamma` is an lr factor in (0, 1];
    a step schedule needs at least one milestone."""
    m = list(obj.milestones)
    if obj.schedule == "step" and not m:
        raise ConfigError(f"{section}.milestones: a step schedule needs at least one milestone, "
                          "e.g. [0.5, 0.75]")
    if any(not 0.0 < x < 1.0 for x in m) or m != sorted(set(m)):
        raise ConfigError(f"{section}.milestones: must be increasing fractions of the run in (0, 1), "
                          f"e.g. [0.5, 0.75]; got {m}")
    if not 0.0 < obj.gamma <= 1.0:
        raise ConfigError(f"{section}.gamma: the lr factor at each milestone must lie in (0, 1], "
                          f"got {obj.gamma}")


def _positive(obj: Any, section: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key}: must be positive, got {value}")


_DECIMAL = re.compile(r"([-+]?)(\d*)(?:\.(\d*))?(?:[eE]([-+]?)(\d+))?")


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
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {value!r}")
        item_hint = args[0]
        return tuple(_convert(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: must be a mapping, got {value!r}")
        key_hint, item_hint = args
        return {
            _convert(k, key_hint, where): _convert(v, item_hint, f"{where}.{k}")
            for k, v in value.items()
        }
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and (spelling := _yaml_number_spelling(value)) is not None:
            raise ConfigError(f"{where}: YAML read {value!r} as text, not a number (YAML 1.1 wants a dot in "
                              f"the mantissa and a sign in the exponent, and no quotes); write {spelling}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):  # .nan and .inf are YAML numbers, and no knob means them
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {value!r}")
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
    except ConfigError:
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
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                          "save the parameters file as UTF-8") from exc
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

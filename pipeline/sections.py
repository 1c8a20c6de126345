"""The `params.yaml` sections, one frozen dataclass each (student experiments: `pipeline.experiments`).

Defaults live here and only here; each section checks its own values on construction and raises
a `ConfigError` naming the key. `pipeline.config` loads them from YAML strictly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from storage.errors import LessonsError

Device = Literal["auto", "cpu", "cuda"]
AdjustMethod = Literal["ps", "lsr", "none"]  # Knowledge Adjustment: probability shift, label smoothing, off
DtdMode = Literal["off", "static", "flsw", "cwsm"]  # an experiment's `dtd` key (README: DTD's names)
# An experiment's `loss` key: Hinton's KD, Decoupled KD, logit standardization, transformed
# teacher matching (README "The logit-KD family"; stages.functional).
KdLoss = Literal["kd", "dkd", "ls", "ttm"]


class ConfigError(LessonsError, ValueError):
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
            raise ConfigError(
                f"data.validation_fraction: must lie in [0, 1) (0.0 = no validation split), "
                f"got {self.validation_fraction}; e.g. 0.1 holds out 10% of each class"
            )
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
                raise ConfigError(
                    f"teacher_train.teachers.{name}: a teacher name must not end in -config or "
                    "-curve (names of the files beside each teacher's metrics); rename it"
                )

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
    # Which views of each image the store holds (DESIGN §5): none (the plain image), all (the
    # augmentation's enumerated views), scheduled (the views seeds × epochs draw), sample (num_views).
    views: Literal["none", "all", "scheduled", "sample"] = "none"
    num_views: int | None = None  # K, for views: sample
    seeds: tuple[int, ...] = (0,)  # the student seeds a scheduled store serves
    epochs: int = 1  # the student epochs a scheduled store serves
    seed: int = 0  # the key of the K sampled views, for views: sample
    # torchrun ranks on this host (DESIGN §6): > 1 runs the dump as that many processes, each
    # forwarding its share of the chunks (one per CUDA device on GPU). The store is byte-identical
    # whatever nproc, so dvc does not track it (dvc.yaml lists this section's other keys).
    nproc: int = 1
    # The teacher's forward under torch.autocast (GPU: ~2x the views/s on tensor cores): the
    # logits then differ from float32 ones by the autocast dtype's rounding, and are recorded so.
    autocast: Literal["none", "bfloat16", "float16"] = "none"
    # What each stored view keeps (DESIGN §9): dense (all C logits) or topk (the K largest logits,
    # their class ids and the full row's log-sum-exp; for large C: 2·K + 2·K + 4 bytes a view).
    layout: Literal["dense", "topk"] = "dense"
    topk: int | None = None  # K, for layout: topk; 1 <= K < C (C checked by check-params)

    def __post_init__(self) -> None:
        _positive(self, "teacher_dump", ("batch_size", "chunk_size", "epochs", "nproc"))
        if self.layout == "topk" and (self.topk is None or self.topk < 1):
            raise ConfigError(
                f"teacher_dump.topk: layout: topk needs topk (an integer K >= 1, below the class "
                f"count C), got {'null' if self.topk is None else self.topk}; set topk: K with 1 <= K < C "
                "(e.g. 10 for C = 1000), or use layout: dense"
            )
        if self.layout != "topk" and self.topk is not None:
            raise ConfigError(
                f"teacher_dump.topk: only read with layout: topk (layout is {self.layout}); "
                "remove it or set layout: topk"
            )
        if self.num_views is not None and self.num_views > 10_000:
            raise ConfigError(
                f"teacher_dump.num_views: {self.num_views} views of every image is beyond what a "
                "store can hold (at most 10000); lower it"
            )
        if self.views == "sample" and (self.num_views is None or self.num_views < 1):
            raise ConfigError(
                f"teacher_dump.num_views: views: sample needs num_views (an integer >= 1), "
                f"got {self.num_views}; set num_views: K"
            )
        if self.views != "sample" and self.num_views is not None:
            raise ConfigError(
                f"teacher_dump.num_views: only read with views: sample (views is {self.views}); "
                "remove it or set views: sample"
            )
        if self.views == "scheduled" and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(
                f"teacher_dump.seeds: views: scheduled needs distinct student seeds, got {list(self.seeds)}"
            )
        for seed in (*self.seeds, self.seed):
            _check_seed(seed, "teacher_dump.seeds")
        if self.chunk_size % self.batch_size:
            raise ConfigError(
                f"teacher_dump.chunk_size: must be a multiple of batch_size ({self.batch_size}) so "
                f"a resumed dump is byte-identical, got {self.chunk_size}"
            )


@dataclass(frozen=True)
class AdjustConfig:
    """Section `adjust` (Knowledge Adjustment, arXiv:1911.07471 §3.1)."""

    methods: tuple[AdjustMethod, ...] = ("ps", "lsr")
    epsilon: float = 0.1  # LSR smoothing mass, in (0, 1)
    # A dask.distributed scheduler address (tcp://host:8786) to run on, or null for local threads;
    # `lessons adjust --scheduler` overrides it. The store is the same either way (not a dvc dep).
    scheduler: str | None = None

    def __post_init__(self) -> None:
        _check_scheduler(self.scheduler, "adjust.scheduler")
        if not 0.0 < self.epsilon < 1.0:
            raise ConfigError(f"adjust.epsilon: must lie in (0, 1), got {self.epsilon}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"adjust.methods: each method once, got {list(self.methods)}")


EnsembleCombine = Literal["log_prob", "prob"]  # mean of log-probabilities (geometric) or of probabilities


@dataclass(frozen=True)
class EnsembleSpec:
    """One entry of `ensemble.ensembles`: the teachers an ensemble combines, and how.

    The stored logits are τ·log q, q the ensemble distribution at τ = `temperature`
    (stages/functional.py `ensemble_logits`; README "Teacher ensembles" says what τ means for a
    student's KD temperature).
    """

    teachers: tuple[str, ...]  # names in teacher_train.teachers, at least two, each once
    combine: EnsembleCombine = "log_prob"
    temperature: float = 1.0  # τ at which the teachers' distributions are combined

    def __post_init__(self) -> None:
        if len(self.teachers) < 2:
            raise ConfigError(
                f"ensemble.ensembles.teachers: an ensemble combines at least two teachers, got "
                f"{list(self.teachers)}; list two or more names of teacher_train.teachers"
            )
        if len(set(self.teachers)) != len(self.teachers):
            raise ConfigError(
                f"ensemble.ensembles.teachers: each teacher once, got {list(self.teachers)}; "
                "remove the duplicate"
            )
        check_temperature(self.temperature, "ensemble.ensembles.temperature")


@dataclass(frozen=True)
class EnsembleConfig:
    """Section `ensemble`: teacher ensembles by name; each becomes `stores/<name>/` (`lessons
    ensemble --ensemble <name>`) and an experiment names it as its `teacher`."""

    ensembles: dict[str, EnsembleSpec] = field(default_factory=dict)

    def ensemble(self, name: str) -> EnsembleSpec:
        if name not in self.ensembles:
            raise ConfigError(
                f"ensemble.ensembles: no ensemble named {name!r}; known: {sorted(self.ensembles)}"
            )
        return self.ensembles[name]


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
    # A dask.distributed scheduler address, or null for local threads (as adjust.scheduler).
    scheduler: str | None = None

    def __post_init__(self) -> None:
        _check_scheduler(self.scheduler, "temperature.scheduler")
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
            raise ConfigError(
                f"temperature.beta: must lie in [-{BETA_LIMIT:g}, {BETA_LIMIT:g}] (beyond, it "
                f"is inf in float32 and 0·beta is NaN), got {self.beta:g}; the clamp to "
                "[min_temperature, max_temperature] already bounds every τ, so a smaller "
                "beta loses nothing"
            )
        if not self.gamma >= 0.0:
            raise ConfigError(f"temperature.gamma: the FLSW exponent must be >= 0, got {self.gamma}")
        if not self.gamma <= GAMMA_LIMIT:
            raise ConfigError(
                f"temperature.gamma: the FLSW exponent must be <= {GAMMA_LIMIT:g} (the weights "
                f"(1 - cos)^gamma reach 2^gamma), got {self.gamma:g}; use e.g. 1 or 2"
            )


def check_temperature(value: float, where: str) -> None:
    """Refuse a temperature outside TEMPERATURE_RANGE with one line naming `where` and the fix.

    Raises:
        ConfigError: `value` < 1e-4 or > 1e4 (or NaN).
    """
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:
        fix = f"raise it to at least {low:g}" if value < high else f"lower it to at most {high:g}"
        raise ConfigError(
            f"{where}: must lie in [{low:g}, {high:g}], where the KD loss is finite in float32 "
            f"for any float16 logits, got {value:g}; {fix}"
        )


@dataclass(frozen=True)
class ReportConfig:
    """Section `report`: the summary table and plots."""

    baseline: str = "ce"  # experiment the Δ column is measured against
    kd_baseline: str = "kd"


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
        raise ConfigError(
            f"{section}.milestones: a step schedule needs at least one milestone, e.g. [0.5, 0.75]"
        )
    if any(not 0.0 < x < 1.0 for x in m) or m != sorted(set(m)):
        raise ConfigError(
            f"{section}.milestones: must be increasing fractions of the run in (0, 1), "
            f"e.g. [0.5, 0.75]; got {m}"
        )
    if not 0.0 < obj.gamma <= 1.0:
        raise ConfigError(
            f"{section}.gamma: the lr factor at each milestone must lie in (0, 1], got {obj.gamma}"
        )


def _check_scheduler(address: str | None, key: str) -> None:
    if address is not None and (not address.strip() or any(c.isspace() for c in address)):
        raise ConfigError(
            f"{key}: {address!r} is not a scheduler address; give one such as tcp://10.0.0.5:8786, or null"
        )


def _positive(obj: Any, section: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key}: must be positive, got {value}")

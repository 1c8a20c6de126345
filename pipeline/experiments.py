"""Section `student_train`: the shared student settings and the experiment matrix.

`StudentTrainConfig.experiment(name, seed)` resolves one experiment against the shared values into
the `ResolvedExperiment` a student stage receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.sections import (
    AdjustMethod,
    ConfigError,
    Device,
    DtdMode,
    KdLoss,
    _check_optimizer,
    _check_schedule,
    _check_seed,
    _positive,
    check_temperature,
)


@dataclass(frozen=True)
class ExperimentConfig:
    """One student experiment. Unset (null) fields fall back to `student_train` defaults."""

    teacher: str | None = None
    kd: bool = True
    adjust: AdjustMethod = "none"
    dtd: DtdMode = "off"
    arch: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    alpha: float | None = None
    # KA-LSR rows (adjust: lsr only): the student side's τ and weight on fixed-target rows; null =
    # 1.0, the student's plain distribution at weight 1 (DESIGN §4; the only setting that did not
    # hurt in the 3-seed tables).
    fixed_target_temperature: float | None = None
    # offline: targets from the stores; online: the teacher checkpoint runs on each batch (the
    # baseline the stores must match; KA and DTD applied on the fly by the same functions).
    teacher_mode: Literal["offline", "online"] = "offline"
    # The distillation term (README "The logit-KD family"), mixed with CE by alpha as KD is: kd
    # (Hinton), dkd (Decoupled KD, arXiv:2203.08679), ls (KD on z-scored logits,
    # arXiv:2403.01427), ttm (transformed teacher matching, arXiv:2402.11148).
    loss: KdLoss = "kd"
    dkd_alpha: float = 1.0  # DKD's TCKD weight (loss: dkd only)
    dkd_beta: float = 8.0  # DKD's NCKD weight, the paper's CIFAR-100 setting (loss: dkd only)
    # Epochs over which the DKD term ramps up linearly (loss: dkd only; 0: none; the authors'
    # code uses 20 on its 240-epoch CIFAR-100 schedule; `stages.functional.dkd_warmup_weight`).
    dkd_warmup: int = 0


#: `student_train` keys an experiment may set for itself (null = the shared value).
OVERRIDABLE = ("arch", "epochs", "batch_size", "lr", "alpha")


def _check_loss(exp: ExperimentConfig, where: str) -> None:
    """Refuse a `loss` that cannot run with the experiment's other keys (one line naming the key)."""
    if exp.loss != "kd" and not exp.kd:
        raise ConfigError(
            f"{where}.loss: {exp.loss} distils a teacher, but kd is false (a cross-entropy student); "
            "set kd: true, or remove loss"
        )
    if exp.loss == "dkd" and exp.adjust == "lsr":
        raise ConfigError(
            f"{where}.loss: dkd is undefined on the fixed-target rows of adjust: lsr (a smoothed "
            "label, no teacher logits to decouple); use adjust: ps or none with dkd, or loss: kd, "
            "ls or ttm with lsr"
        )
    if exp.loss == "ttm" and exp.fixed_target_temperature is not None:
        raise ConfigError(
            f"{where}.fixed_target_temperature: ttm never softens the student (τ = 1 on its side), so "
            "fixed rows have no student temperature to set; remove the key, or use loss: kd or ls"
        )
    for key in ("dkd_alpha", "dkd_beta"):
        value = getattr(exp, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{where}.{key}: must be a finite number >= 0, got {value}")
    if exp.dkd_warmup < 0:
        raise ConfigError(f"{where}.dkd_warmup: must be a number of epochs >= 0, got {exp.dkd_warmup}")
    for key in ("dkd_alpha", "dkd_beta", "dkd_warmup"):
        if exp.loss != "dkd" and getattr(exp, key) != getattr(ExperimentConfig, key):
            student = f"loss: {exp.loss}" if exp.kd else "kd: false, a cross-entropy student"
            raise ConfigError(
                f"{where}.{key}: only read with loss: dkd (this experiment has {student}); remove it"
            )


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
    # Lessons larger than this (bytes, all arrays a student reads) are streamed from the stores
    # once per epoch in chunk order instead of held in memory (DESIGN §5).
    max_lesson_bytes: int = 4 * 1024**3
    # Processes training each student (DESIGN §6): > 1 runs it as that many torchrun ranks under
    # DistributedDataParallel (one per CUDA device on GPU), each on batch_size / nproc images of
    # every step. The result depends on it (float rounding; BatchNorm statistics per rank), so dvc
    # tracks it. Under your own torchrun (several hosts) set it to the job's world size.
    nproc: int = 1
    # Mixed precision on CUDA (bf16 autocast where the GPU has it, else fp16 with a GradScaler);
    # no effect on CPU, where students train in float32 as ever.
    amp: bool = True
    experiments: dict[str, ExperimentConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive(
            self, "student_train", ("epochs", "batch_size", "lr", "num_workers", "max_lesson_bytes", "nproc")
        )
        for key, batch_size in [
            ("student_train.batch_size", self.batch_size),
            *(
                (f"student_train.experiments.{name}.batch_size", exp.batch_size)
                for name, exp in self.experiments.items()
            ),
        ]:
            if batch_size is not None and batch_size > 0 and batch_size % self.nproc:
                raise ConfigError(
                    f"{key}: {batch_size} is not divisible by student_train.nproc {self.nproc} (each "
                    f"process takes batch_size / nproc images of every step); use a multiple of {self.nproc}"
                )
        _check_optimizer(self, "student_train")
        _check_schedule(self, "student_train")
        for name, exp in self.experiments.items():
            _positive(exp, f"student_train.experiments.{name}", ("epochs", "batch_size", "lr"))
            if exp.alpha is not None and not 0.0 <= exp.alpha <= 1.0:
                raise ConfigError(
                    f"student_train.experiments.{name}.alpha: must lie in [0, 1], got {exp.alpha}"
                )
            value = exp.fixed_target_temperature
            if value is not None and (exp.adjust != "lsr" or not (value > 0 and math.isfinite(value))):
                raise ConfigError(
                    f"student_train.experiments.{name}.fixed_target_temperature: a positive number, and "
                    f"only with adjust: lsr (got {value}, adjust={exp.adjust})"
                )
            if value is not None:
                check_temperature(value, f"student_train.experiments.{name}.fixed_target_temperature")
            _check_loss(exp, f"student_train.experiments.{name}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(
                f"student_train.seeds: must be a non-empty list of distinct integers, got {list(self.seeds)}"
            )
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
                f"student_train.experiments: no experiment named {name!r}; known: {sorted(self.experiments)}"
            )
        return self.experiments[name]

    def experiment(self, name: str, seed: int | None = None) -> ResolvedExperiment:
        """The experiment `name` (for `seed`, default the first of `seeds`) with every unset
        field filled from the shared defaults."""
        exp = self.experiment_config(name)
        if exp.kd and exp.teacher is None:
            raise ConfigError(f"student_train.experiments.{name}.teacher: required when kd is true")
        if not exp.kd and (exp.adjust != "none" or exp.dtd != "off" or exp.teacher_mode != "offline"):
            raise ConfigError(
                f"student_train.experiments.{name}: adjust/dtd/teacher_mode need kd: true "
                f"(got adjust={exp.adjust}, dtd={exp.dtd}, teacher_mode={exp.teacher_mode})"
            )
        if exp.teacher_mode == "online" and exp.dtd == "static":
            raise ConfigError(
                f"student_train.experiments.{name}.dtd: static reads τ^T precomputed over the whole dump "
                "(dtd.zarr), which an online teacher does not have: use teacher_mode: offline, or dtd: "
                "flsw, cwsm or off"
            )
        fixed_target_temperature = exp.fixed_target_temperature
        if fixed_target_temperature is None and exp.adjust == "lsr":
            fixed_target_temperature = 1.0  # DESIGN §4: the plain student distribution, weight 1
        pick = lambda key: getattr(self, key) if getattr(exp, key) is None else getattr(exp, key)  # noqa: E731
        resolved = ResolvedExperiment(
            name=name,
            teacher=exp.teacher,
            kd=exp.kd,
            adjust=exp.adjust,
            dtd=exp.dtd,
            fixed_target_temperature=fixed_target_temperature,
            teacher_mode=exp.teacher_mode,
            loss=exp.loss,
            dkd_alpha=exp.dkd_alpha,
            dkd_beta=exp.dkd_beta,
            dkd_warmup=exp.dkd_warmup,
            arch=pick("arch"),
            epochs=pick("epochs"),
            batch_size=pick("batch_size"),
            lr=pick("lr"),
            alpha=pick("alpha"),
            seed=self.seeds[0] if seed is None else seed,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            milestones=self.milestones,
            gamma=self.gamma,
            augment=self.augment,
            num_workers=self.num_workers,
            device=self.device,
            max_lesson_bytes=self.max_lesson_bytes,
            nproc=self.nproc,
            amp=self.amp,
        )
        return resolved  # every field was checked on load (shared values and overrides alike)


@dataclass(frozen=True)
class ResolvedExperiment:
    """A student experiment with shared defaults applied (what `student_train.run` receives)."""

    name: str
    teacher: str | None
    kd: bool
    adjust: AdjustMethod
    dtd: DtdMode
    fixed_target_temperature: float | None
    teacher_mode: Literal["offline", "online"]
    loss: KdLoss
    dkd_alpha: float
    dkd_beta: float
    dkd_warmup: int
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
    max_lesson_bytes: int
    nproc: int
    amp: bool

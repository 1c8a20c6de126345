"""Stage `student_train`: train one student experiment from the precomputed lessons.

The student reads images from the dataset's FFCV beton and, for every batch, gathers its
targets by `sample_index` from the epoch's lessons (`stages.lessons`): the KA store's
`target_logits` and `fixed_target`, `dtd.zarr`'s `static_temperature` (written by the
`temperature` stage; for `dtd: static`), and the raw teacher logits (for FLSW), each of the
view the student trains on this epoch. The teacher network is
never loaded. Every store is checked against the beton's manifest (dataset fingerprint,
sample_index, classes, views) and against each other (same teacher checkpoint) before training.

`teacher_mode: online` is the baseline the stores must match: the teacher checkpoint runs in
eval mode on the very batch the student sees, and KA and DTD are applied to its logits on the
fly by the same functions the stages run (`knowledge_adjustment`, `kd_batch_loss`).

Loss (DESIGN §4, arXiv:1911.07471 §3): L = (1−α)·CE(s, y) + α·(1/B)·Σ τ_x²·KL(q_x ‖ p^{τ_x}(s)),
with τ_x from `dtd`: off (τ0), static (teacher-only τ^T), flsw or cwsm (online, batch mean). The
experiment's `loss` swaps the distillation term for another of the logit-KD family (dkd, ls,
ttm; `stages.functional.distillation_loss`) on the same targets and temperatures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import nets
from stages.adjust import knowledge_adjustment
from stages.distributed import Ranks, barrier, process_group
from stages.functional import distillation_loss, dkd_warmup_weight
from stages.lessons import Lessons, LessonStores, open_lessons
from stages.temperature import cwsm_weights, dynamic_temperature, flsw_weights
from stages.topk import TopkRows, topk_kd_loss, topk_teacher_logits_estimate
from stages.training import (
    Explain,
    Fit,
    channel_stats,
    check_batch_size,
    config_path,
    data_record,
    dataset_record,
    explain_cross_entropy,
    fit,
    load_checkpoint,
    logits_blowup,
    owns_outputs,
    save_checkpoint,
    topk_accuracy,
    training_state_path,
)
from stages.views import training_augmentation
from storage import StoreError, atomic_write_json, open_store
from storage.beton import make_loader
from storage.errors import SettingsError
from storage.manifest import file_sha256, read_prepared

if TYPE_CHECKING:
    from pipeline.config import DataConfig, DtdMode, ResolvedExperiment, TemperatureConfig

logger = logging.getLogger(__name__)


def lesson_loss(
    loss: str,
    student_logits: Tensor,
    targets: Tensor | TopkRows,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float | Tensor,
    fixed_target: Tensor,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
) -> Tensor:
    """The experiment's `loss` over dense (B, C) targets (`stages.functional.distillation_loss`),
    or `topk_kd_loss` over top-k ones (DESIGN §4, §9; top-k targets serve `loss: kd` only, which
    `run` checks before training).

    Raises:
        SettingsError: top-k targets with a loss other than kd.
    """
    if isinstance(targets, TopkRows):
        if loss != "kd":
            raise SettingsError(TOPK_LOSS_ERROR.format(loss=loss))
        return topk_kd_loss(
            student_logits,
            targets.values,
            targets.indices,
            targets.lse,
            labels,
            alpha=alpha,
            temperature=temperature,
            fixed_target=fixed_target,
        )
    return distillation_loss(
        loss,
        student_logits,
        targets,
        labels,
        alpha=alpha,
        temperature=temperature,
        fixed_target=fixed_target,
        dkd_alpha=dkd_alpha,
        dkd_beta=dkd_beta,
    )


TOPK_LOSS_ERROR = (
    "loss: {loss} needs every teacher logit, and the teacher's store is top-k (teacher_dump.layout: "
    "topk); use loss: kd with it, or dump the teacher with layout: dense"
)


def batch_supervision(
    student_logits: Tensor,
    sample_index: Tensor,
    *,
    lessons: Lessons,
    dtd: DtdMode,
    temperature_config: TemperatureConfig,
    fixed_target_temperature: float | None = None,
) -> tuple[Tensor | TopkRows, Tensor, float | Tensor]:
    """The targets, fixed-target mask and temperatures of one batch (pure; DESIGN §4).

    Args:
        student_logits: (B, C) float (DTD flsw/cwsm weigh it, detached). sample_index: (B,) int64.
        lessons, dtd, temperature_config, fixed_target_temperature: see `kd_batch_loss`.
    Returns:
        (target_logits (B, C), or `TopkRows` of B rows from a top-k store; fixed_target (B,)
        bool; temperature: a float τ0 or (B,) τ_x). FLSW from a top-k store weighs the teacher
        logits `topk_teacher_logits_estimate` fills in (an estimate outside the top k).
    Raises:
        ValueError: an unknown dtd mode, or NaN/inf DTD weights (from NaN/inf student logits).
    """
    index = sample_index.to(lessons.fixed_target.device)
    targets = lessons.target_logits[index]
    fixed = lessons.fixed_target[index]
    clamp = dict(
        base_temperature=temperature_config.base_temperature,
        beta=temperature_config.beta,
        min_temperature=temperature_config.min_temperature,
        max_temperature=temperature_config.max_temperature,
    )
    if dtd == "off":
        temperature: float | Tensor = temperature_config.base_temperature
    elif dtd == "static":
        assert lessons.static_temperature is not None
        temperature = lessons.static_temperature[index]
    elif dtd == "flsw":
        assert lessons.teacher_logits is not None
        teacher = lessons.teacher_logits[index]  # (B, C), or B top-k rows
        if isinstance(teacher, TopkRows):
            teacher = topk_teacher_logits_estimate(
                teacher.values, teacher.indices, teacher.lse, teacher.num_classes
            )
        weights = flsw_weights(student_logits.detach(), teacher, temperature_config.gamma)
        temperature = dynamic_temperature(weights, **clamp)
    elif dtd == "cwsm":
        temperature = dynamic_temperature(cwsm_weights(student_logits.detach()), **clamp)
    else:
        raise ValueError(f"unknown dtd mode {dtd!r}")
    if fixed_target_temperature is not None:
        per_row = torch.as_tensor(temperature, dtype=student_logits.dtype, device=student_logits.device)
        temperature = torch.where(
            fixed,
            torch.full_like(student_logits[:, 0], fixed_target_temperature),
            per_row.expand(student_logits.shape[0]),
        )
    return targets, fixed, temperature


def kd_batch_loss(
    student_logits: Tensor,
    labels: Tensor,
    sample_index: Tensor,
    *,
    lessons: Lessons,
    alpha: float,
    dtd: DtdMode,
    temperature_config: TemperatureConfig,
    fixed_target_temperature: float | None = None,
    loss: str = "kd",
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
) -> Tensor:
    """The KD loss of one batch with targets gathered by `sample_index` (pure; DESIGN §4).

    Args:
        student_logits: (B, C) float. labels: (B,) int64. sample_index: (B,) int64 on any device.
        lessons: the experiment's supervision (dense or top-k targets: `kd_loss` or
            `topk_kd_loss`). dtd: off | static | flsw | cwsm.
        temperature_config: TemperatureConfig (τ0, β, γ, clamp range).
        fixed_target_temperature: None (DESIGN §4: a fixed-target row's student side is
            softened by the row's τ_x and its KL weighted by τ_x²), or a τ > 0 used instead on
            fixed-target (KA-LSR) rows only, for the student's softmax and the τ² weight alike
            (1.0: the student's plain distribution matched to the smoothed label, weight 1).
        loss: the experiment's `loss` (kd | dkd | ls | ttm), with `dkd_alpha` and `dkd_beta`
            for dkd (`stages.functional.distillation_loss`).
    Returns:
        scalar loss.
    """
    targets, fixed, temperature = batch_supervision(
        student_logits,
        sample_index,
        lessons=lessons,
        dtd=dtd,
        temperature_config=temperature_config,
        fixed_target_temperature=fixed_target_temperature,
    )
    return lesson_loss(
        loss,
        student_logits,
        targets,
        labels,
        alpha=alpha,
        temperature=temperature,
        fixed_target=fixed,
        dkd_alpha=dkd_alpha,
        dkd_beta=dkd_beta,
    )


def explain_nonfinite_kd_loss(
    student_logits: Tensor,
    labels: Tensor,
    sample_index: Tensor,
    *,
    lessons: Lessons,
    alpha: float,
    dtd: DtdMode,
    temperature_config: TemperatureConfig,
    fixed_target_temperature: float | None = None,
    loss: str = "kd",
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
    where: str = "student_train",
    lr: float | None = None,
) -> str:
    """Why the KD loss of this batch is NaN/inf and which knob fixes it, in one sentence.

    Called only once the loss already is not finite (the training step stays as cheap as ever).
    The student diverged (lower the learning rate) when its logits are NaN/inf, beyond
    `temperature_config.logit_limit`, or its CE term is not finite. Otherwise the KD term is: a
    temperature outside `temperature_config.temperature_range` names the temperature knob that
    set it (temperature.*, the experiment's fixed_target_temperature, or dtd.zarr's static
    temperatures), teacher targets beyond the logit limit name the store.

    Args:
        student_logits: (B, C) float, the batch's logits. labels: (B,) int64. sample_index: (B,).
        lessons, alpha, dtd, temperature_config, fixed_target_temperature, loss, dkd_alpha,
            dkd_beta: as `kd_batch_loss`.
        where: the experiment's params key, e.g. "student_train.experiments.kd".
        lr: the experiment's learning rate, quoted in the message.
    Returns:
        One line (no trailing period): the part that is not finite, the temperatures in use, the fix.
    """
    student_logits = student_logits.detach()
    low, high = temperature_config.temperature_range
    limit = temperature_config.logit_limit
    lower_lr = (
        f"lower the learning rate (student_train.lr, or {where}.lr{'' if lr is None else f'; now {lr:g}'})"
    )
    blowup = logits_blowup(student_logits, limit=limit)
    if blowup is not None:
        return f"the student diverged ({blowup}); {lower_lr}"
    targets, fixed, temperature = batch_supervision(
        student_logits,
        sample_index,
        lessons=lessons,
        dtd=dtd,
        temperature_config=temperature_config,
        fixed_target_temperature=fixed_target_temperature,
    )
    ce = F.cross_entropy(student_logits.float(), labels)
    if not bool(torch.isfinite(ce)):
        peak = student_logits.abs().amax().item()
        return f"the student diverged (the CE term is {ce.item()}, its logits reach ±{peak:.3g}); {lower_lr}"
    kd = lesson_loss(
        loss,
        student_logits,
        targets,
        labels,
        alpha=1.0,
        temperature=temperature,
        fixed_target=fixed,
        dkd_alpha=dkd_alpha,
        dkd_beta=dkd_beta,
    )
    taus = torch.as_tensor(temperature, dtype=torch.float64).reshape(-1)
    coldest, hottest = taus.min().item(), taus.max().item()
    term = "KD" if loss == "kd" else loss.upper()
    facts = (
        f"the {term} term (weight alpha={alpha:g}) is {kd.item()}, the CE term {ce.item():.4g}, "
        f"with dtd={dtd} and temperatures in [{coldest:.3g}, {hottest:.3g}]"
    )
    if not low <= coldest <= hottest <= high:
        if fixed_target_temperature is not None and not low <= fixed_target_temperature <= high:
            fix = f"set {where}.fixed_target_temperature within it"
        elif dtd == "static":
            fix = (
                "rebuild dtd.zarr (lessons temperature) with temperature.min_temperature and "
                "max_temperature within it"
            )
        else:
            fix = (
                "set temperature.min_temperature, base_temperature and max_temperature within it "
                f"(now {temperature_config.min_temperature:g}, {temperature_config.base_temperature:g}, "
                f"{temperature_config.max_temperature:g}; beta {temperature_config.beta:g} only moves τ "
                "between them)"
            )
        return f"{facts}, outside [{low:g}, {high:g}] where the KD loss is finite in float32; {fix}"
    target_peak = (targets.values if isinstance(targets, TopkRows) else targets).abs().amax().item()
    if target_peak > limit:
        return (
            f"{facts}: the teacher's stored logits reach ±{target_peak:.3g}, beyond ±{limit:g}; "
            "rebuild the stores from a teacher with smaller logits"
        )
    return f"{facts} and logits within ±{limit:g}, which should be finite; rerun with -v and report it"


class Supervision(TypedDict):
    """The loss settings of one experiment, as `kd_batch_loss` and `explain_nonfinite_kd_loss` take them."""

    alpha: float
    dtd: DtdMode
    temperature_config: TemperatureConfig
    fixed_target_temperature: float | None
    loss: str
    dkd_alpha: float
    dkd_beta: float


class OnlineTeacher:
    """The teacher checkpoint run in eval mode on every batch the student sees (`teacher_mode:
    online`, the baseline offline lessons must match; Beyer et al. 2022's consistent teacher).

    `observe(inputs)` runs the teacher on the normalised batch, `lessons(labels)` turns its logits
    into that batch's Lessons (rows 0..B-1) with the same `knowledge_adjustment` the KA stage runs.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        manifest: dict[str, Any],
        method: str,
        epsilon: float,
        device: torch.device,
    ) -> None:
        model, _ = load_checkpoint(checkpoint, manifest=manifest)
        self.model = model.to(device).eval()
        self.sha256 = file_sha256(checkpoint)
        self.method, self.epsilon = method, epsilon
        self.logits: Tensor | None = None

    @torch.no_grad()
    def observe(self, inputs: Tensor) -> None:
        """Run the teacher on `inputs` (B, C, H, W) float32, normalised as the student's."""
        self.logits = self.model(inputs).float()

    def lessons(self, labels: Tensor) -> Lessons:
        """The Lessons of the batch last observed: (B, C) targets after KA, the raw logits for FLSW."""
        assert self.logits is not None, "observe() runs before the loss"
        adjusted = knowledge_adjustment(
            self.logits,
            labels.to(self.logits.device),
            self.method,  # type: ignore[arg-type]
            self.epsilon,
        )
        return Lessons(
            target_logits=adjusted.target_logits,
            fixed_target=adjusted.fixed_target,
            teacher_logits=self.logits,
            static_temperature=None,
        )


def teacher_agreement(student_logits: np.ndarray, teacher_logits: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean KL(teacher ‖ student) at τ = 1 (nats), over (N, C) logits."""
    s = torch.from_numpy(student_logits).double()
    t = torch.from_numpy(teacher_logits).double()
    log_p, log_q = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(dim=1)  # (N,) nats, as in kd_loss
    return {
        "agreement_top1": float((s.argmax(1) == t.argmax(1)).double().mean()),
        "mean_kl_teacher": float(kl.mean()),
    }


def run(
    experiment: ResolvedExperiment,
    *,
    temperature_config: TemperatureConfig,
    data_dir: str | Path,
    stores_dir: str | Path | None,
    checkpoint_out: str | Path,
    metrics_out: str | Path,
    curve_out: str | Path,
    device: torch.device,
    resume: bool = True,
    data_config: DataConfig | None = None,
    overrides: dict[str, Any] | None = None,
    teacher_checkpoint: str | Path | None = None,
    epsilon: float = 0.1,
) -> dict[str, Any]:
    """Train student `experiment.name` and write its checkpoint, metrics, config record and curve.

    The metrics file holds numbers only (val_top1 with a val split, test_top1, top-5, agreement
    with the teacher, wall time); `config_path(metrics_out)` holds the experiment's name, its
    teacher (name, architecture, checkpoint sha256), the resolved experiment, the `temperature`
    and `data` sections used, the experiment's own overrides and the split sizes. The checkpoint
    carries the same recipe. With a `val` split the student is evaluated on `val` and `test`
    after every epoch (it never trains on `val`).

    Args:
        experiment: ResolvedExperiment. temperature_config: TemperatureConfig.
        data_dir: the prepared dataset folder. stores_dir: `stores/<teacher>` (None for CE
            without a teacher).
        resume: continue from `<checkpoint_out>.state` when it was saved by the same
            experiment on the same data and stores (otherwise start afresh).
        data_config: the DataConfig used (recorded; default: the manifest's record).
        overrides: the keys the experiment sets itself in params.yaml, over `student_train`'s
            shared values (recorded for the report's settings column; default: none known).
        teacher_checkpoint: the teacher's checkpoint, read only with `teacher_mode: online`.
        epsilon: KA-LSR's smoothing mass (`adjust.epsilon`), read only online with adjust lsr.
    Run as one process, or as every rank of a torchrun job of `experiment.nproc` ranks
    (DESIGN §6; `lessons student-train` starts them): each rank trains on its share of every
    step's batch under DistributedDataParallel (see `stages.training.fit`), and rank 0 alone
    locks and writes the outputs. With `experiment.amp` on CUDA the steps run in mixed precision.

    Returns:
        the metrics dict (numbers only); {} on ranks other than 0.
    Raises:
        ManifestError, StoreError (stale or misaligned stores), UnknownArchitectureError,
        SettingsError (a job of another size than `student_train.nproc`), RankError (rank 0
        refused the outputs, e.g. another run holds their lock).
    """
    with process_group(device) as ranks:
        if experiment.nproc != ranks.world_size:
            raise SettingsError(
                f"student_train.nproc is {experiment.nproc}, but this job has {ranks.world_size} "
                f"process(es); run `lessons student-train` (it starts the ranks), or torchrun with "
                f"{experiment.nproc} ranks in all, or set student_train.nproc: {ranks.world_size}"
            )
        metrics = _train(
            experiment,
            temperature_config=temperature_config,
            data_dir=data_dir,
            stores_dir=stores_dir,
            checkpoint_out=checkpoint_out,
            metrics_out=metrics_out,
            curve_out=curve_out,
            device=ranks.device(device),
            resume=resume,
            data_config=data_config,
            overrides=overrides,
            teacher_checkpoint=teacher_checkpoint,
            epsilon=epsilon,
            ranks=ranks,
        )
        barrier()  # every rank ends once rank 0 has written the outputs
        return metrics


@owns_outputs
def _train(
    experiment: ResolvedExperiment,
    *,
    temperature_config: TemperatureConfig,
    data_dir: str | Path,
    stores_dir: str | Path | None,
    checkpoint_out: str | Path,
    metrics_out: str | Path,
    curve_out: str | Path,
    device: torch.device,
    resume: bool,
    data_config: DataConfig | None,
    overrides: dict[str, Any] | None,
    teacher_checkpoint: str | Path | None,
    epsilon: float,
    ranks: Ranks,
) -> dict[str, Any]:
    data_dir, checkpoint_out = Path(data_dir), Path(checkpoint_out)
    manifest = read_prepared(data_dir)
    image_shape = tuple(manifest["image_shape"])
    height, _, channels = image_shape
    num_train = manifest["splits"]["train"]["num_samples"]
    check_batch_size(experiment.batch_size, num_train, f"student_train.experiments.{experiment.name}")
    num_test = manifest["splits"]["test"]["num_samples"]
    num_val = manifest["splits"]["val"]["num_samples"] if "val" in manifest["splits"] else 0
    where = f"student_train.experiments.{experiment.name}"
    if experiment.kd and experiment.loss == "dkd" and experiment.adjust == "lsr":  # as the config refuses
        raise StoreError(
            f"{where}.loss: dkd is undefined on the fixed-target rows of the KA-LSR store "
            "(adjusted-lsr.zarr); use adjust: ps or none with dkd, or loss: kd, ls or ttm with lsr"
        )
    augmentation = training_augmentation(image_shape, experiment.augment)
    lesson_stores: LessonStores | None = None
    teacher, teacher_test = None, None
    store_digests: dict[str, str] = {}
    if stores_dir is not None:
        stores_dir = Path(stores_dir)
        if experiment.kd and experiment.teacher_mode == "offline":
            lesson_stores, teacher, store_digests = open_lessons(
                stores_dir,
                adjust=experiment.adjust,
                dtd=experiment.dtd,
                manifest=manifest,
                augmentation=augmentation,
                max_bytes=experiment.max_lesson_bytes,
                device=device,
                where=where,
            )
            lesson_stores.check_covers(experiment.seed, experiment.epochs, where=where)
            if experiment.loss != "kd" and lesson_stores.topk:
                raise SettingsError(f"{where}: " + TOPK_LOSS_ERROR.format(loss=experiment.loss))
        test_store = open_store(stores_dir / "test-logits.zarr", kind="logits")
        test_store.expect(
            dataset_fingerprint=manifest["splits"]["test"]["fingerprint"],
            num_classes=manifest["num_classes"],
            split="test",
            against=f"the prepared dataset ({manifest['dataset']})",
        )
        test_store.expect(num_views=1, against="the test split (always the plain image)")
        if teacher is not None and test_store.attrs["teacher"] != teacher:
            raise StoreError(
                f"{stores_dir / 'test-logits.zarr'}: from another teacher checkpoint than "
                f"{stores_dir / 'logits.zarr'}; rerun teacher-dump"
            )
        teacher = test_store.attrs["teacher"]
        teacher_test = test_store.read_view("logits").astype(np.float32)
    elif experiment.kd:
        raise StoreError(f"experiment {experiment.name}: kd needs the teacher's stores")
    online: OnlineTeacher | None = None
    online_ensemble = teacher is not None and teacher.get("arch") == "ensemble"
    if experiment.kd and experiment.teacher_mode == "online" and teacher is not None and online_ensemble:
        raise StoreError(
            f"{where}: teacher_mode online runs one teacher checkpoint, but {stores_dir} holds an "
            f"ensemble of {len(teacher.get('members', []))} teachers (lessons ensemble); use "
            "teacher_mode: offline"
        )
    if experiment.kd and experiment.teacher_mode == "online":
        if teacher_checkpoint is None:
            raise StoreError(
                f"{where}: teacher_mode online needs the teacher checkpoint (--teacher-checkpoint)"
            )
        online = OnlineTeacher(
            teacher_checkpoint, manifest=manifest, method=experiment.adjust, epsilon=epsilon, device=device
        )
        if teacher is not None and online.sha256 != teacher.get("checkpoint_sha256"):
            raise StoreError(
                f"{teacher_checkpoint}: is not the checkpoint the stores in {stores_dir} were "
                "dumped from (sha256 differs); rerun teacher-dump or name the right checkpoint"
            )
        store_digests = {Path(teacher_checkpoint).name: online.sha256}

    if experiment.kd and experiment.dkd_warmup > experiment.epochs:
        logger.warning(
            "%s.dkd_warmup is %d epochs, longer than the run's %d: the DKD term never reaches its "
            "full weight (it ends at %.3g)",
            where,
            experiment.dkd_warmup,
            experiment.epochs,
            dkd_warmup_weight(experiment.epochs - 1, experiment.dkd_warmup),
        )
    current: dict[str, Lessons] = {}
    dkd_weight = [1.0]  # this epoch's DKD warm-up weight (loss: dkd with dkd_warmup)

    def epoch_views(epoch: int) -> np.ndarray | None:
        """Gather the epoch's lessons (offline) and return the view params the student trains on."""
        dkd_weight[0] = dkd_warmup_weight(epoch, experiment.dkd_warmup)
        if lesson_stores is None:
            return None
        current["lessons"], params = lesson_stores.epoch(experiment.seed, epoch, where=where)
        return params

    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor]
    explain: Explain
    if experiment.kd:

        def batch_lessons(labels: Tensor, index: Tensor) -> tuple[Lessons, Tensor]:
            if online is None:
                return current["lessons"], index
            return online.lessons(labels), torch.arange(labels.shape[0])

        supervision = Supervision(
            alpha=experiment.alpha,
            dtd=experiment.dtd,
            temperature_config=temperature_config,
            fixed_target_temperature=experiment.fixed_target_temperature,
            loss=experiment.loss,
            dkd_alpha=experiment.dkd_alpha,
            dkd_beta=experiment.dkd_beta,
        )

        def epoch_supervision() -> Supervision:
            """`supervision` with DKD's weights scaled by this epoch's warm-up (1 without one)."""
            scaled = supervision.copy()
            scaled["dkd_alpha"] *= dkd_weight[0]
            scaled["dkd_beta"] *= dkd_weight[0]
            return scaled

        def kd_loss_fn(logits: Tensor, labels: Tensor, index: Tensor) -> Tensor:
            lessons, rows = batch_lessons(labels, index)
            return kd_batch_loss(logits, labels, rows, lessons=lessons, **epoch_supervision())

        def explain_kd(logits: Tensor, labels: Tensor, index: Tensor) -> str:
            lessons, rows = batch_lessons(labels, index)
            return explain_nonfinite_kd_loss(
                logits,
                labels,
                rows,
                lessons=lessons,
                **epoch_supervision(),
                where=where,
                lr=experiment.lr,
            )

        loss_fn, explain = kd_loss_fn, explain_kd
    else:
        loss_fn = lambda logits, labels, _index: F.cross_entropy(logits, labels)  # noqa: E731
        explain = explain_cross_entropy(
            "student", f"the learning rate (student_train.lr, or {where}.lr; now {experiment.lr:g})"
        )

    torch.manual_seed(experiment.seed)
    model = nets.build_net(
        experiment.arch, manifest["num_classes"], in_channels=channels, image_size=height
    ).to(device)
    fit_config = Fit(
        epochs=experiment.epochs,
        lr=experiment.lr,
        momentum=experiment.momentum,
        weight_decay=experiment.weight_decay,
        schedule=experiment.schedule,
        milestones=experiment.milestones,
        gamma=experiment.gamma,
        seed=experiment.seed,
        augment=experiment.augment,
        image_shape=image_shape,
        batch_size=experiment.batch_size,
        amp=experiment.amp,
    )
    train_loader = make_loader(
        data_dir / "train.beton",
        batch_size=experiment.batch_size // ranks.world_size,  # divisible: checked on load
        shuffle=True,
        seed=experiment.seed,
        drop_last=True,
        num_workers=experiment.num_workers,
        shard=(ranks.rank, ranks.world_size) if ranks.distributed else None,
        torch_threads=ranks.threads() if ranks.distributed else None,
    )
    test_loader = (  # rank 0 alone evaluates
        make_loader(
            data_dir / "test.beton", batch_size=512, shuffle=False, num_workers=experiment.num_workers
        )
        if ranks.main
        else None
    )
    val_loader = (
        make_loader(data_dir / "val.beton", batch_size=512, shuffle=False, num_workers=experiment.num_workers)
        if num_val and ranks.main
        else None
    )
    temperature_used = {  # the temperature keys the student's loss reads (not histogram_bins)
        "base_temperature": temperature_config.base_temperature,
        "beta": temperature_config.beta,
        "gamma": temperature_config.gamma,
        "min_temperature": temperature_config.min_temperature,
        "max_temperature": temperature_config.max_temperature,
    }
    run_key = hashlib.sha256(
        json.dumps(
            {
                "experiment": dataclasses.asdict(experiment),
                "temperature": temperature_used,
                "train_fingerprint": manifest["splits"]["train"]["fingerprint"],
                "teacher": teacher,
                "stores": store_digests,  # a state saved while training on other soft labels is not resumed
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    mean, std = channel_stats(manifest, device)
    result = fit(
        model,
        fit_config,
        train_loader=train_loader,
        test_loader=test_loader,
        num_train=num_train,
        num_test=num_test,
        mean=mean,
        std=std,
        device=device,
        loss_fn=loss_fn,
        state_path=training_state_path(checkpoint_out),
        resume=resume,
        run_key=run_key,
        desc=f"student {experiment.name}",
        explain=explain,
        val_loader=val_loader,
        num_val=num_val,
        epoch_views=epoch_views,
        on_inputs=None if online is None else online.observe,
        ranks=ranks,
    )
    if not ranks.main:
        return {}
    test_logits, test_labels = result["test_logits"], result["test_labels"]
    metrics: dict[str, Any] = {
        **(
            {
                "val_top1": topk_accuracy(result["val_logits"], result["val_labels"], 1),
                "val_top5": topk_accuracy(result["val_logits"], result["val_labels"], 5),
            }
            if num_val
            else {}
        ),
        "test_top1": topk_accuracy(test_logits, test_labels, 1),
        "test_top5": topk_accuracy(test_logits, test_labels, 5),
        "wall_s": round(result["wall_s"], 2),
        "images_per_s": round(result["images_per_s"], 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if teacher_test is not None:
        metrics["teacher_test_top1"] = topk_accuracy(teacher_test, test_labels, 1)
        metrics.update(teacher_agreement(test_logits, teacher_test))
    recipe = {
        "experiment": experiment.name,
        "seed": experiment.seed,
        "teacher": None
        if teacher is None
        else {key: teacher.get(key) for key in ("name", "arch", "checkpoint_sha256")},
        "config": dataclasses.asdict(experiment),
        "overrides": dict(overrides or {}),
        "temperature": temperature_used,
        "data": data_record(manifest, data_config),
    }
    save_checkpoint(checkpoint_out, model, arch=experiment.arch, manifest=manifest, extra=recipe)
    atomic_write_json(curve_out, result["curve"])
    atomic_write_json(config_path(metrics_out), {**recipe, "dataset": dataset_record(manifest)})
    atomic_write_json(metrics_out, metrics)
    training_state_path(checkpoint_out).unlink(missing_ok=True)
    logger.info("student %s: test top-1 %.4f", experiment.name, metrics["test_top1"])
    return metrics

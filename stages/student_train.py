"""Stage `student_train`: train one student experiment from the precomputed lessons.

The student reads images from the dataset's FFCV beton and, for every batch, gathers its
targets by `sample_index` from tensors loaded once per run: the KA store's `target_logits` and
`fixed_target`, `dtd.zarr`'s `static_temperature` (written by the `temperature` stage; for
`dtd: static`), and the raw teacher logits (for FLSW).
The teacher network is never loaded. Every store is checked against the beton's manifest
(dataset fingerprint, sample_index, classes) and against each other (same teacher checkpoint)
before training starts.

Loss (DESIGN §4, arXiv:1911.07471 §3): L = (1−α)·CE(s, y) + α·(1/B)·Σ τ_x²·KL(q_x ‖ p^{τ_x}(s)),
with τ_x from `dtd`: off (τ0), static (teacher-only τ^T), flsw or cwsm (online, batch mean).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import nets
from stages.functional import kd_loss
from stages.temperature import cwsm_weights, dynamic_temperature, flsw_weights
from stages.training import (
    Fit,
    channel_stats,
    check_batch_size,
    config_path,
    data_record,
    dataset_record,
    explain_cross_entropy,
    fit,
    logits_blowup,
    owns_outputs,
    save_checkpoint,
    topk_accuracy,
    training_state_path,
)
from storage import StoreError, atomic_write_json, open_store
from storage.beton import make_loader
from storage.manifest import read_prepared

if TYPE_CHECKING:
    from pipeline.config import AdjustMethod, DataConfig, DtdMode, ResolvedExperiment, TemperatureConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Lessons:
    """The per-sample supervision of one experiment, indexed by sample_index, on one device.

    target_logits: (N, C) float32 (KA-adjusted teacher logits, or log q for fixed rows).
    fixed_target: (N,) bool (LSR rows: use softmax(target) without softening).
    teacher_logits: (N, C) float32, the teacher as dumped (for FLSW), or None.
    static_temperature: (N,) float32 τ^T, or None.
    """

    target_logits: Tensor
    fixed_target: Tensor
    teacher_logits: Tensor | None
    static_temperature: Tensor | None


def batch_supervision(student_logits: Tensor, sample_index: Tensor, *, lessons: Lessons, dtd: DtdMode,
                      temperature_config: TemperatureConfig, fixed_target_temperature: float | None = None
                      ) -> tuple[Tensor, Tensor, float | Tensor]:
    """The targets, fixed-target mask and temperatures of one batch (pure; DESIGN §4).

    Args:
        student_logits: (B, C) float (DTD flsw/cwsm weigh it, detached). sample_index: (B,) int64.
        lessons, dtd, temperature_config, fixed_target_temperature: see `kd_batch_loss`.
    Returns:
        (target_logits (B, C), fixed_target (B,) bool, temperature: a float τ0 or (B,) τ_x).
    Raises:
        ValueError: an unknown dtd mode, or NaN/inf DTD weights (from NaN/inf student logits).
    """
    index = sample_index.to(lessons.target_logits.device)
    targets = lessons.target_logits[index]
    fixed = lessons.fixed_target[index]
    clamp = dict(base_temperature=temperature_config.base_temperature, beta=temperature_config.beta,
                 min_temperature=temperature_config.min_temperature,
                 max_temperature=temperature_config.max_temperature)
    if dtd == "off":
        temperature: float | Tensor = temperature_config.base_temperature
    elif dtd == "static":
        assert lessons.static_temperature is not None
        temperature = lessons.static_temperature[index]
    elif dtd == "flsw":
        assert lessons.teacher_logits is not None
        weights = flsw_weights(student_logits.detach(), lessons.teacher_logits[index], temperature_config.gamma)
        temperature = dynamic_temperature(weights, **clamp)
    elif dtd == "cwsm":
        temperature = dynamic_temperature(cwsm_weights(student_logits.detach()), **clamp)
    else:
        raise ValueError(f"unknown dtd mode {dtd!r}")
    if fixed_target_temperature is not None:
        per_row = torch.as_tensor(temperature, dtype=student_logits.dtype, device=student_logits.device)
        temperature = torch.where(fixed, torch.full_like(student_logits[:, 0], fixed_target_temperature),
                                  per_row.expand(student_logits.shape[0]))
    return targets, fixed, temperature


def kd_batch_loss(student_logits: Tensor, labels: Tensor, sample_index: Tensor, *, lessons: Lessons,
                  alpha: float, dtd: DtdMode, temperature_config: TemperatureConfig,
                  fixed_target_temperature: float | None = None) -> Tensor:
    """The KD loss of one batch with targets gathered by `sample_index` (pure; DESIGN §4).

    Args:
        student_logits: (B, C) float. labels: (B,) int64. sample_index: (B,) int64 on any device.
        lessons: the experiment's supervision. dtd: off | static | flsw | cwsm.
        temperature_config: TemperatureConfig (τ0, β, γ, clamp range).
        fixed_target_temperature: None (DESIGN §4: a fixed-target row's student side is
            softened by the row's τ_x and its KL weighted by τ_x²), or a τ > 0 used instead on
            fixed-target (KA-LSR) rows only, for the student's softmax and the τ² weight alike
            (1.0: the student's plain distribution matched to the smoothed label, weight 1).
    Returns:
        scalar loss.
    """
    targets, fixed, temperature = batch_supervision(
        student_logits, sample_index, lessons=lessons, dtd=dtd, temperature_config=temperature_config,
        fixed_target_temperature=fixed_target_temperature)
    return kd_loss(student_logits, targets, labels, alpha=alpha, temperature=temperature, fixed_target=fixed)


def explain_nonfinite_kd_loss(student_logits: Tensor, labels: Tensor, sample_index: Tensor, *,
                              lessons: Lessons, alpha: float, dtd: DtdMode,
                              temperature_config: TemperatureConfig,
                              fixed_target_temperature: float | None = None,
                              where: str = "student_train", lr: float | None = None) -> str:
    """Why the KD loss of this batch is NaN/inf and which knob fixes it, in one sentence.

    Called only once the loss already is not finite (the training step stays as cheap as ever).
    The student diverged (lower the learning rate) when its logits are NaN/inf, beyond
    `temperature_config.logit_limit`, or its CE term is not finite. Otherwise the KD term is: a
    temperature outside `temperature_config.temperature_range` names the temperature knob that
    set it (temperature.*, the experiment's fixed_target_temperature, or dtd.zarr's static
    temperatures), teacher targets beyond the logit limit name the store.

    Args:
        student_logits: (B, C) float, the batch's logits. labels: (B,) int64. sample_index: (B,).
        lessons, alpha, dtd, temperature_config, fixed_target_temperature: as `kd_batch_loss`.
        where: the experiment's params key, e.g. "student_train.experiments.kd".
        lr: the experiment's learning rate, quoted in the message.
    Returns:
        One line (no trailing period): the part that is not finite, the temperatures in use, the fix.
    """
    student_logits = student_logits.detach()
    low, high = temperature_config.temperature_range
    limit = temperature_config.logit_limit
    lower_lr = f"lower the learning rate (student_train.lr, or {where}.lr{'' if lr is None else f'; now {lr:g}'})"
    blowup = logits_blowup(student_logits, limit=limit)
    if blowup is not None:
        return f"the student diverged ({blowup}); {lower_lr}"
    targets, fixed, temperature = batch_supervision(
        student_logits, sample_index, lessons=lessons, dtd=dtd, temperature_config=temperature_config,
        fixed_target_temperature=fixed_target_temperature)
    ce = F.cross_entropy(student_logits.float(), labels)
    if not bool(torch.isfinite(ce)):
        peak = student_logits.abs().amax().item()
        return f"the student diverged (the CE term is {ce.item()}, its logits reach ±{peak:.3g}); {lower_lr}"
    kd = kd_loss(student_logits, targets, labels, alpha=1.0, temperature=temperature, fixed_target=fixed)
    taus = torch.as_tensor(temperature, dtype=torch.float64).reshape(-1)
    coldest, hottest = taus.min().item(), taus.max().item()
    facts = (f"the KD term (weight alpha={alpha:g}) is {kd.item()}, the CE term {ce.item():.4g}, with dtd={dtd} "
             f"and temperatures in [{coldest:.3g}, {hottest:.3g}]")
    if not low <= coldest <= hottest <= high:
        if fixed_target_temperature is not None and not low <= fixed_target_temperature <= high:
            fix = f"set {where}.fixed_target_temperature within it"
        elif dtd == "static":
            fix = ("rebuild dtd.zarr (lessons temperature) with temperature.min_temperature and "
                   "max_temperature within it")
        else:
            fix = ("set temperature.min_temperature, base_temperature and max_temperature within it "
                   f"(now {temperature_config.min_temperature:g}, {temperature_config.base_temperature:g}, "
                   f"{temperature_config.max_temperature:g}; beta {temperature_config.beta:g} only moves τ "
                   "between them)")
        return f"{facts}, outside [{low:g}, {high:g}] where the KD loss is finite in float32; {fix}"
    target_peak = targets.abs().amax().item()
    if target_peak > limit:
        return (f"{facts}: the teacher's stored logits reach ±{target_peak:.3g}, beyond ±{limit:g}; "
                "rebuild the stores from a teacher with smaller logits")
    return f"{facts} and logits within ±{limit:g}, which should be finite; rerun with -v and report it"


def load_lessons(store_dir: Path, *, adjust: AdjustMethod, dtd: DtdMode, manifest: dict[str, Any],
                 device: torch.device) -> tuple[Lessons, dict[str, Any], dict[str, str]]:
    """Load and cross-check the stores of one teacher for one experiment.

    Reads `logits.zarr`, `adjusted-<adjust>.zarr` (unless adjust is none) and `dtd.zarr`
    (for dtd static). Only view 0 is used (V = 1 stores).

    Returns:
        (lessons on `device`, the teacher attributes of the logits store, {store folder name:
        content digest} of every store read).
    Raises:
        StoreError: a store is missing or unfinished, or its fingerprint, class count,
            sample_index or teacher checkpoint does not match, or a KA/DTD store was derived
            from another dump than `logits.zarr` (content digest or sample_index).
    """
    train = manifest["splits"]["train"]
    expected = dict(dataset_fingerprint=train["fingerprint"], num_classes=manifest["num_classes"])
    dataset = f"the prepared dataset ({manifest['dataset']})"
    logits_path = store_dir / "logits.zarr"
    logits_store = open_store(logits_path, kind="logits")
    logits_store.expect(**expected, split="train", against=dataset)
    logits_store.expect_sample_index(np.arange(train["num_samples"], dtype=np.int64), against=dataset)
    teacher = logits_store.attrs["teacher"]
    teacher_logits = _finite(logits_store, "logits")
    digests = {logits_path.name: logits_store.content_digest}
    if adjust == "none":
        target_logits, fixed = teacher_logits, torch.zeros(teacher_logits.shape[0], dtype=torch.bool)
    else:
        adjusted = open_store(store_dir / f"adjusted-{adjust}.zarr", kind="adjusted")
        adjusted.expect(**expected, method=adjust, against=dataset)
        adjusted.expect(teacher=teacher, against=str(logits_path))
        adjusted.expect_source(logits_store)
        digests[adjusted.path.name] = adjusted.content_digest
        target_logits = _finite(adjusted, "target_logits")
        fixed = torch.from_numpy(adjusted.read_view("fixed_target"))
    static = None
    if dtd == "static":
        dtd_store = open_store(store_dir / "dtd.zarr", kind="dtd")
        dtd_store.expect(**expected, against=dataset)
        dtd_store.expect(teacher=teacher, against=str(logits_path))
        dtd_store.expect_source(logits_store)
        digests[dtd_store.path.name] = dtd_store.content_digest
        static = _finite(dtd_store, "static_temperature", positive=True)
    lessons = Lessons(
        target_logits=target_logits.to(device), fixed_target=fixed.to(device),
        teacher_logits=teacher_logits.to(device) if dtd == "flsw" else None,
        static_temperature=static.to(device) if static is not None else None,
    )
    return lessons, teacher, digests


def _finite(store: Any, name: str, *, positive: bool = False) -> Tensor:
    """View 0 of array `name` as float32, refused when it holds NaN/inf, or with `positive` a value
    <= 0 (temperatures): the KD loss checks nothing per step, and training on them would only
    report a NaN loss. A missing chunk never gets here: `open_store` refuses it."""
    values = store.read_view(name).astype(np.float32)
    bad = ~(np.isfinite(values) & (values > 0)) if positive else ~np.isfinite(values)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
        what = "NaN/inf or values <= 0" if positive else "NaN/inf"
        raise StoreError(f"{store.path}: {name} has {what} in {rows.size} rows (first: sample "
                         f"{int(rows[0])}); lessons never writes them, so the store was changed after it "
                         "was written: rebuild it")
    return torch.from_numpy(values)


def teacher_agreement(student_logits: np.ndarray, teacher_logits: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean KL(teacher ‖ student) at τ = 1 (nats), over (N, C) logits."""
    s = torch.from_numpy(student_logits).double()
    t = torch.from_numpy(teacher_logits).double()
    log_p, log_q = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(dim=1)  # (N,) nats, as in kd_loss
    return {"agreement_top1": float((s.argmax(1) == t.argmax(1)).double().mean()),
            "mean_kl_teacher": float(kl.mean())}


@owns_outputs
def run(experiment: ResolvedExperiment, *, temperature_config: TemperatureConfig, data_dir: str | Path,
        stores_dir: str | Path | None,
        checkpoint_out: str | Path, metrics_out: str | Path, curve_out: str | Path,
        device: torch.device, resume: bool = True, data_config: DataConfig | None = None,
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
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
    Returns:
        the metrics dict (numbers only).
    Raises:
        ManifestError, StoreError (stale or misaligned stores), UnknownArchitectureError.
    """
    data_dir, checkpoint_out = Path(data_dir), Path(checkpoint_out)
    manifest = read_prepared(data_dir)
    image_shape = tuple(manifest["image_shape"])
    height, _, channels = image_shape
    num_train = manifest["splits"]["train"]["num_samples"]
    check_batch_size(experiment.batch_size, num_train, f"student_train.experiments.{experiment.name}")
    num_test = manifest["splits"]["test"]["num_samples"]
    num_val = manifest["splits"]["val"]["num_samples"] if "val" in manifest["splits"] else 0
    lessons, teacher, teacher_test = None, None, None
    store_digests: dict[str, str] = {}
    if stores_dir is not None:
        stores_dir = Path(stores_dir)
        if experiment.kd:
            lessons, teacher, store_digests = load_lessons(stores_dir, adjust=experiment.adjust,
                                                           dtd=experiment.dtd, manifest=manifest, device=device)
        test_store = open_store(stores_dir / "test-logits.zarr", kind="logits")
        test_store.expect(dataset_fingerprint=manifest["splits"]["test"]["fingerprint"],
                          num_classes=manifest["num_classes"], split="test",
                          against=f"the prepared dataset ({manifest['dataset']})")
        if teacher is not None and test_store.attrs["teacher"] != teacher:
            raise StoreError(f"{stores_dir / 'test-logits.zarr'}: from another teacher checkpoint than "
                             f"{stores_dir / 'logits.zarr'}; rerun teacher-dump")
        teacher = test_store.attrs["teacher"]
        teacher_test = test_store.read_view("logits").astype(np.float32)
    elif experiment.kd:
        raise StoreError(f"experiment {experiment.name}: kd needs the teacher's stores")

    where = f"student_train.experiments.{experiment.name}"
    if experiment.kd:
        assert lessons is not None
        supervision = dict(lessons=lessons, alpha=experiment.alpha, dtd=experiment.dtd,
                           temperature_config=temperature_config,
                           fixed_target_temperature=experiment.fixed_target_temperature)
        loss_fn = lambda logits, labels, index: kd_batch_loss(logits, labels, index, **supervision)  # noqa: E731
        explain = lambda logits, labels, index: explain_nonfinite_kd_loss(  # noqa: E731
            logits, labels, index, **supervision, where=where, lr=experiment.lr)
    else:
        loss_fn = lambda logits, labels, _index: F.cross_entropy(logits, labels)  # noqa: E731
        explain = explain_cross_entropy(
            "student", f"the learning rate (student_train.lr, or {where}.lr; now {experiment.lr:g})")

    torch.manual_seed(experiment.seed)
    model = nets.build_net(experiment.arch, manifest["num_classes"], in_channels=channels,
                           image_size=height).to(device)
    fit_config = Fit(epochs=experiment.epochs, lr=experiment.lr, momentum=experiment.momentum,
                     weight_decay=experiment.weight_decay, schedule=experiment.schedule,
                     milestones=experiment.milestones, gamma=experiment.gamma, seed=experiment.seed,
                     augment=experiment.augment, image_shape=image_shape,
                     batch_size=experiment.batch_size)
    train_loader = make_loader(data_dir / "train.beton", batch_size=experiment.batch_size, shuffle=True,
                               seed=experiment.seed,
                               drop_last=True, num_workers=experiment.num_workers)
    test_loader = make_loader(data_dir / "test.beton", batch_size=512, shuffle=False,
                              num_workers=experiment.num_workers)
    val_loader = make_loader(data_dir / "val.beton", batch_size=512, shuffle=False,
                             num_workers=experiment.num_workers) if num_val else None
    temperature_used = {  # the temperature keys the student's loss reads (not histogram_bins)
        "base_temperature": temperature_config.base_temperature, "beta": temperature_config.beta,
        "gamma": temperature_config.gamma, "min_temperature": temperature_config.min_temperature,
        "max_temperature": temperature_config.max_temperature}
    run_key = hashlib.sha256(json.dumps({
        "experiment": dataclasses.asdict(experiment),
        "temperature": temperature_used,
        "train_fingerprint": manifest["splits"]["train"]["fingerprint"], "teacher": teacher,
        "stores": store_digests,  # a state saved while training on other soft labels is not resumed
    }, sort_keys=True, default=str).encode()).hexdigest()
    mean, std = channel_stats(manifest, device)
    result = fit(model, fit_config, train_loader=train_loader, test_loader=test_loader,
                 num_train=num_train, num_test=num_test, mean=mean, std=std, device=device,
                 loss_fn=loss_fn, state_path=training_state_path(checkpoint_out),
                 resume=resume, run_key=run_key, desc=f"student {experiment.name}", explain=explain,
                 val_loader=val_loader, num_val=num_val)
    test_logits, test_labels = result["test_logits"], result["test_labels"]
    metrics: dict[str, Any] = {
        **({"val_top1": topk_accuracy(result["val_logits"], result["val_labels"], 1),
            "val_top5": topk_accuracy(result["val_logits"], result["val_labels"], 5)} if num_val else {}),
        "test_top1": topk_accuracy(test_logits, test_labels, 1),
        "test_top5": topk_accuracy(test_logits, test_labels, 5),
        "wall_s": round(result["wall_s"], 2), "images_per_s": round(result["images_per_s"], 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if teacher_test is not None:
        metrics["teacher_test_top1"] = topk_accuracy(teacher_test, test_labels, 1)
        metrics.update(teacher_agreement(test_logits, teacher_test))
    recipe = {
        "experiment": experiment.name, "seed": experiment.seed,
        "teacher": None if teacher is None else {key: teacher.get(key) for key in
                                                 ("name", "arch", "checkpoint_sha256")},
        "config": dataclasses.asdict(experiment), "overrides": dict(overrides or {}),
        "temperature": temperature_used, "data": data_record(manifest, data_config),
    }
    save_checkpoint(checkpoint_out, model, arch=experiment.arch, manifest=manifest, extra=recipe)
    atomic_write_json(curve_out, result["curve"])
    atomic_write_json(config_path(metrics_out), {**recipe, "dataset": dataset_record(manifest)})
    atomic_write_json(metrics_out, metrics)
    training_state_path(checkpoint_out).unlink(missing_ok=True)
    logger.info("student %s: test top-1 %.4f", experiment.name, metrics["test_top1"])
    return metrics

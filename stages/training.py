"""What teacher and student training share: input normalisation, the optimiser and schedule,
evaluation over a whole split, and checkpoint files.

A checkpoint is one `torch.save` file holding the state dict and what is needed to rebuild and
check the net: architecture, classes, input shape, normalisation and the train split's
fingerprint. Its sha256 identifies the teacher in every store written from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

import nets
from stages.distributed import Ranks, from_main, gather
from stages.progress import progress
from stages.views import Augmentation, training_augmentation
from storage.atomic import OutputError, atomic_write_bytes, ensure_parents, exclusive_lock
from storage.errors import LessonsError, SettingsError

if TYPE_CHECKING:
    from pipeline.config import DataConfig

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class CheckpointError(LessonsError, ValueError):
    """A checkpoint file is missing, unreadable, or for another architecture or dataset."""


class DivergenceError(LessonsError, FloatingPointError):
    """The training loss became NaN or inf; the message names the cause and the knob to change."""


def owns_outputs(run: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a training stage's `run`: create the folders of `checkpoint_out`, `metrics_out`
    and `curve_out` first and hold `<checkpoint_out>.lock` for the whole run, so an unwritable
    output fails before any training and a second run writing the same outputs is refused at
    once (OutputError) instead of interleaving training states and result files.

    Under torchrun (a `ranks` keyword, passed on to `run`), rank 0 alone creates, locks and
    checks the outputs, since it alone writes them; the other ranks wait for its verdict and
    stop with its one-line error (RankError) when it refused them."""

    @functools.wraps(run)
    def locked(
        *args: Any,
        checkpoint_out: str | Path,
        metrics_out: str | Path,
        curve_out: str | Path,
        ranks: Ranks | None = None,
        **kwargs: Any,
    ) -> Any:
        with contextlib.ExitStack() as stack:

            def claim() -> None:
                ensure_parents(checkpoint_out, metrics_out, curve_out)
                stack.enter_context(exclusive_lock(checkpoint_out))
                refuse_foreign_checkpoint(checkpoint_out)
                # refuses a file lessons did not write
                read_training_state(training_state_path(checkpoint_out))

            from_main(ranks or Ranks(), claim)
            return run(
                *args,
                checkpoint_out=checkpoint_out,
                metrics_out=metrics_out,
                curve_out=curve_out,
                **({} if ranks is None else {"ranks": ranks}),
                **kwargs,
            )

    return locked


def refuse_foreign_checkpoint(path: str | Path) -> None:
    """Refuse to overwrite an existing file at `path` unless it is a checkpoint lessons saved
    (`save_checkpoint`: a dict holding `checkpoint_version`).

    Raises:
        OutputError: naming the path; the file is left as it is.
    """
    path = Path(path)
    if not path.is_file():
        return
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable payload: not ours
        payload = None
    if not (isinstance(payload, dict) and "checkpoint_version" in payload):
        raise OutputError(
            errno.EEXIST,
            f"{path}: exists and is not a checkpoint lessons saved; lessons only "
            "replaces its own outputs: choose another output path or move it away",
        )


def training_state_path(checkpoint_out: str | Path) -> Path:
    """Where a run saves its resumable training state: `<checkpoint_out>.state`."""
    checkpoint_out = Path(checkpoint_out)
    return checkpoint_out.with_name(checkpoint_out.name + ".state")


def read_training_state(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The training state saved at `path` by `fit`, or None when there is none.

    Raises:
        OutputError: something else is at `path` (a folder, a link, a file that is not a training
            state of lessons); it is left as it is, since the run would overwrite it.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return None
    foreign = OutputError(
        errno.EEXIST,
        f"{path}: exists and is not a training state of lessons; lessons "
        "saves its resumable state under this name: move it away and run again",
    )
    if path.is_symlink() or not path.is_file():
        raise foreign
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # any unreadable payload: not ours
        raise foreign from exc
    if not (isinstance(state, dict) and "run_key" in state):
        raise foreign
    return state


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float32 (images/255 − mean)/std, per channel (mean, std: (C,))."""
    x = images.float().div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def check_batch_size(batch_size: int, num_train: int, where: str) -> None:
    """Refuse a training batch larger than the training split: the last partial batch is dropped,
    so no optimiser step would run (and the loader would try to allocate the whole batch).

    Raises:
        SettingsError: batch_size > num_train.
    """
    if batch_size > num_train:
        raise SettingsError(
            f"{where}: batch_size {batch_size} exceeds the {num_train} training images "
            "(the last partial batch is dropped, so no step would run); lower batch_size"
        )


def channel_stats(manifest: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the train split, from the manifest, as (C,) float32."""
    mean = torch.tensor(manifest["pixel_mean"], dtype=torch.float32, device=device)
    std = torch.tensor(manifest["pixel_std"], dtype=torch.float32, device=device)
    return mean, std


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum; no weight decay on biases and BatchNorm parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)


def learning_rate(
    base_lr: float,
    progress: float,
    schedule: str = "cosine",
    milestones: Iterable[float] = (0.5, 0.75),
    gamma: float = 0.1,
    warmup: float = 0.0,
) -> float:
    """The learning rate at `progress` ∈ [0, 1] of the run (per step, not per epoch).

    cosine: base·½(1 + cos(π·p)); step: base·gamma^(milestones passed). A linear warm-up over
    the first `warmup` fraction multiplies either.
    """
    if schedule == "cosine":
        lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    else:
        lr = base_lr * gamma ** sum(progress >= m for m in milestones)
    if warmup > 0 and progress < warmup:
        lr *= progress / warmup
    return lr


@torch.no_grad()  # not inference_mode: ffcv fills its buffers from another thread
def predict(
    model: nn.Module, loader: Iterable, num_samples: int, mean: Tensor, std: Tensor, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every sample of a sequential loader, in sample_index order.

    Returns:
        logits (N, C) float32 and labels (N,) int64, row i = sample_index i.
    Raises:
        RuntimeError: the loader did not cover every sample exactly once.
    """
    model.eval()
    logits_parts, index_parts, label_parts = [], [], []
    for images, labels, sample_index in loader:
        out = model(normalize(images.to(device, non_blocking=True), mean, std))
        logits_parts.append(out.float().cpu())
        label_parts.append(labels.clone())
        index_parts.append(sample_index.clone())
    order = torch.cat(index_parts).numpy()
    if order.shape[0] != num_samples or not np.array_equal(np.sort(order), np.arange(num_samples)):
        raise RuntimeError(f"evaluation covered {order.shape[0]} rows, expected each of {num_samples} once")
    logits = torch.cat(logits_parts).numpy()
    labels = torch.cat(label_parts).numpy().astype(np.int64)
    inverse = np.argsort(order, kind="stable")
    return logits[inverse], labels[inverse]


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the k largest logits. logits (N, C), labels (N,)."""
    k = min(k, logits.shape[1])
    topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


def config_path(metrics_out: str | Path) -> Path:
    """`<stem>-config.json` beside `metrics_out`: the run's names, strings, lists and fully
    resolved configuration, so that the metrics file itself holds numbers only (`dvc metrics
    show` and `dvc exp show` columns stay numeric)."""
    metrics_out = Path(metrics_out)
    return metrics_out.with_name(f"{metrics_out.stem}-config.json")


def data_record(manifest: dict[str, Any], data_config: DataConfig | None = None) -> dict[str, Any]:
    """The `data` section a run used, defaults included: `data_config` (a DataConfig) as a dict,
    else the one the manifest records (whose `validation_fraction` is left out at its default 0.0)."""
    if data_config is not None:
        return dataclasses.asdict(data_config)
    return {"validation_fraction": 0.0, **manifest.get("data", {})}


def dataset_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """Name, class count and the size of each split (train, val when present, test) of a dataset."""
    return {
        "name": manifest["dataset"],
        "num_classes": manifest["num_classes"],
        "splits": {name: info["num_samples"] for name, info in manifest["splits"].items()},
    }


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    manifest: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically and return its sha256."""
    payload = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "arch": arch,
        "num_classes": manifest["num_classes"],
        "image_shape": list(manifest["image_shape"]),
        "pixel_mean": manifest["pixel_mean"],
        "pixel_std": manifest["pixel_std"],
        "dataset_fingerprint": manifest["splits"]["train"]["fingerprint"],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def load_checkpoint(
    path: str | Path, *, arch: str | None = None, manifest: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the net of a checkpoint and check it fits `arch` and the manifest's dataset.

    A bare state dict (a checkpoint made elsewhere) is accepted when `arch` and `manifest` are
    given; its keys and shapes must then fit `arch` exactly.

    Returns:
        (model on CPU in eval mode, checkpoint metadata without the state dict).
    Raises:
        CheckpointError: unreadable file, another architecture, class count or input shape.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(payload).__name__}")
    if "state_dict" in payload and "arch" in payload:
        meta = {k: v for k, v in payload.items() if k != "state_dict"}
        state = payload["state_dict"]
    else:  # a bare state dict
        if arch is None or manifest is None:
            raise CheckpointError(f"{path}: a bare state dict needs the architecture to be named")
        meta = {
            "arch": arch,
            "num_classes": manifest["num_classes"],
            "image_shape": list(manifest["image_shape"]),
        }
        state = payload
    if arch is not None and meta["arch"] != arch:
        raise CheckpointError(f"{path}: checkpoint is a {meta['arch']!r}, params.yaml says {arch!r}")
    if manifest is not None:
        if meta["num_classes"] != manifest["num_classes"]:
            raise CheckpointError(
                f"{path}: checkpoint has {meta['num_classes']} classes, the dataset "
                f"has {manifest['num_classes']}"
            )
        if list(meta["image_shape"]) != list(manifest["image_shape"]):
            raise CheckpointError(
                f"{path}: checkpoint expects images {tuple(meta['image_shape'])}, "
                f"the dataset has {tuple(manifest['image_shape'])}"
            )
    height, _, channels = meta["image_shape"]
    model = nets.build_net(meta["arch"], meta["num_classes"], in_channels=channels, image_size=height)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{path}: weights do not fit {meta['arch']!r}: {first[1].strip() if len(first) > 1 else first[0]}"
        ) from exc
    return model.eval(), meta


class Precision:
    """Mixed precision for training steps (`student_train.amp`): on CUDA, the forward under
    `torch.autocast` in bfloat16 where the GPU has it, else float16 with a `GradScaler` (whose
    skipped steps on overflow are its own business); elsewhere, or disabled, plain float32 steps.
    Losses are computed from float32 logits either way (STYLE: math in float32)."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.enabled and self.dtype == torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context of a training forward: autocast on CUDA, nothing otherwise."""
        return torch.autocast("cuda", dtype=self.dtype) if self.enabled else contextlib.nullcontext()

    def step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimiser step (through the GradScaler with float16)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


Explain = Callable[[Tensor, Tensor, Tensor], str]
"""(logits, labels, sample_index) -> why the loss of this batch is not finite and which knob fixes
it, one sentence; called only once the loss already is NaN/inf (never on the normal path)."""


def logits_blowup(logits: Tensor, *, limit: float = math.inf) -> str | None:
    """Say how `logits` (B, C) diverged, or None when every value is finite and |value| <= limit."""
    logits = logits.detach()
    bad_rows = (~torch.isfinite(logits).all(dim=1)).sum().item()
    if bad_rows:
        return f"its logits are NaN/inf in {bad_rows} of {logits.shape[0]} rows"
    peak = logits.abs().amax().item() if logits.numel() else 0.0
    return (
        f"its logits reach ±{peak:.3g}, beyond ±{limit:g} where the KD loss overflows"
        if peak > limit
        else None
    )


def explain_cross_entropy(who: str, knobs: str) -> Explain:
    """The explanation for a plain cross-entropy loss (teachers, CE students): only the net's own
    logits can make it non-finite, so the fix is the optimiser's `knobs` (e.g. lr, weight_decay)."""

    def explain(logits: Tensor, labels: Tensor, sample_index: Tensor) -> str:
        how = logits_blowup(logits) or f"its logits reach ±{logits.detach().abs().amax().item():.3g}"
        return f"the {who} diverged ({how}); lower {knobs}"

    return explain


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    prepare: Callable[[Tensor, Tensor], Tensor],
    lr_at: Callable[[int], float],
    step: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    explain: Explain | None = None,
    precision: Precision | None = None,
) -> tuple[float, int, int]:
    """One pass over `loader`, per-step learning rate.

    Args:
        loss_fn: (logits, labels, sample_index) -> scalar loss.
        prepare: (uint8 images, sample_index) -> normalised float inputs (augmentation inside).
        lr_at: global step -> learning rate. step: global step at the start of the epoch.
        explain: says which part of the loss is not finite and which knob to change; called
            only on a NaN/inf loss (or when `loss_fn` refuses NaN/inf logits), so it costs nothing
            per step. None: a plain cross-entropy net whose knob is the learning rate.
        precision: mixed precision on CUDA (`Precision`); None: float32 steps.
    Returns:
        (mean loss, number of samples seen, global step at the end).
    Raises:
        DivergenceError (a FloatingPointError): the loss became NaN or inf; one line naming the
            cause and the knob.
    """
    explain = explain or explain_cross_entropy("net", "the learning rate")
    precision = precision or Precision(False, device)
    model.train()
    total_loss, seen = 0.0, 0
    for images, labels, sample_index in loader:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        inputs = prepare(images.to(device, non_blocking=True), sample_index)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(inputs)
        logits = logits.float()  # the loss in float32 (the same tensor when it already is)
        try:
            loss = loss_fn(logits, labels, sample_index)
        except ValueError as exc:  # e.g. DTD weights refusing NaN student logits: name the real cause
            if logits_blowup(logits) is None:
                raise
            raise DivergenceError(
                f"loss is not finite at step {step}: {explain(logits.detach(), labels, sample_index)}"
            ) from exc
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"loss is {loss.item()} at step {step}: {explain(logits.detach(), labels, sample_index)}"
            )
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss, optimizer)
        batch = labels.shape[0]
        total_loss += loss.item() * batch
        seen += batch
        step += 1
        if on_batch is not None:
            on_batch(batch)
    return total_loss / max(seen, 1), seen, step


class Fit:
    """Everything `fit` needs besides the model and the loss (one teacher or student run)."""

    def __init__(
        self,
        *,
        epochs: int,
        lr: float,
        momentum: float,
        weight_decay: float,
        schedule: str = "cosine",
        milestones: Iterable[float] = (0.5, 0.75),
        gamma: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        image_shape: tuple[int, int, int],
        batch_size: int,
        amp: bool = False,
    ) -> None:
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.schedule, self.milestones, self.gamma, self.seed = schedule, tuple(milestones), gamma, seed
        self.augment, self.image_shape, self.batch_size = augment, tuple(image_shape), batch_size
        self.amp = amp  # mixed precision on CUDA (`Precision`); batch_size: the global batch

    @property
    def augmentation(self) -> Augmentation:
        """The training augmentation (`stages.views.training_augmentation`): pad-4 crop + flip
        for 32×32, flip only below, random-resized-crop + flip from 64 px, identity without `augment`."""
        return training_augmentation(self.image_shape, self.augment)


def fit(
    model: nn.Module,
    fit_config: Fit,
    *,
    train_loader: Any,
    test_loader: Any,
    num_train: int,
    num_test: int,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    state_path: Path | None = None,
    resume: bool = False,
    run_key: str = "",
    desc: str = "train",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    explain: Explain | None = None,
    val_loader: Any = None,
    num_val: int = 0,
    epoch_views: Callable[[int], np.ndarray | None] | None = None,
    on_inputs: Callable[[Tensor], None] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Train `model` for `fit_config.epochs` epochs, evaluating on the val split (when
    `val_loader` is given) and the test split after each.

    The training state (weights, optimiser, curve, step) is saved atomically to `state_path`
    after every epoch; with `resume`, a saved state is loaded and training continues from the
    next epoch, so the result equals an uninterrupted run (same order, same keyed views). A
    state saved under another `run_key` (other settings, data or teacher) is ignored.

    `explain` names the cause and the knob when the loss turns NaN/inf (see `train_epoch`).

    Each image is trained on the view `fit_config.augmentation` draws for (seed, epoch,
    sample_index), unless `epoch_views(epoch)` — called at the start of every epoch, e.g. to
    gather that epoch's lessons — returns the (N, P) view params of every sample (the views
    whose teacher targets a multi-view store holds). `on_inputs` sees every normalised input
    batch before the student does (an online teacher's forward).

    Under torchrun (`ranks`, DESIGN §6) every rank calls `fit` with a `train_loader` sharded to
    its share of each epoch (`storage.beton.shard_order`), and `fit` wraps the model in
    DistributedDataParallel (gloo on CPU, nccl on CUDA): gradients are averaged over the ranks,
    so a step trains on the one-process run's global batch. What differs from one process,
    besides float rounding: BatchNorm normalises each rank's own share of the batch (DDP
    broadcasts rank 0's running statistics), and a loss with batch statistics (DTD cwsm/flsw
    temperatures) sees that share. Rank 0 alone evaluates, logs and saves the training state; a
    resumed run loads the state rank 0 reads on every rank. The curve's train_loss is the mean
    over all ranks' images.

    Returns:
        {"curve": [{"epoch", "train_loss", ("val_top1", "val_top5",) "test_top1", "test_top5",
         "lr", "elapsed_s"}...], "wall_s", "images_per_s" (training steps only), "test_logits"
         (N_test, C) float32, "test_labels", and with a val split "val_logits" (N_val, C) and
         "val_labels"}. On ranks other than 0 the logits are None and the curve is not kept
        (rank 0's result is the run's).
    """
    ranks = ranks or Ranks()
    precision = Precision(fit_config.amp, device)
    augmentation = fit_config.augmentation
    steps_per_epoch = max(1, len(train_loader))
    total_steps = fit_config.epochs * steps_per_epoch
    optimizer = sgd(model, fit_config.lr, fit_config.momentum, fit_config.weight_decay)
    curve: list[dict[str, Any]] = []
    start_epoch, step, elapsed_s, train_time_s, train_seen = 0, 0, 0.0, 0.0, 0

    def saved_state() -> dict[str, Any] | None:  # rank 0's, sent to every rank (on CPU, then)
        if not (resume and state_path is not None):
            return None
        saved = read_training_state(state_path, "cpu" if ranks.distributed else device)
        if saved is not None and saved.get("run_key") != run_key:
            logger.warning("%s: ignoring %s, saved by a run with other settings", desc, state_path)
            saved = None
        return saved

    state = from_main(ranks, saved_state)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        precision.load_state_dict(state.get("scaler", {}))
        start_epoch, step, curve = state["epoch"], state["step"], list(state["curve"])
        elapsed_s, train_time_s, train_seen = state["elapsed_s"], state["train_time_s"], state["train_seen"]
        if ranks.main:
            logger.info("%s: resuming after epoch %d of %d", desc, start_epoch, fit_config.epochs)
    net: nn.Module = model
    if ranks.distributed:  # after the state is loaded: DDP starts every rank from rank 0's weights
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    train_loader.next_epoch = start_epoch  # epoch e is ordered by storage.beton.epoch_order(seed, e)

    def prepare(images: Tensor, sample_index: Tensor, epoch: int, params: np.ndarray | None) -> Tensor:
        index = sample_index.numpy()
        view = augmentation.draw(fit_config.seed, epoch, index)[1] if params is None else params[index]
        inputs = normalize(augmentation.apply(images, view), mean, std)
        if on_inputs is not None:
            on_inputs(inputs)
        return inputs

    def lr_at(global_step: int) -> float:
        return learning_rate(
            fit_config.lr,
            global_step / total_steps,
            fit_config.schedule,
            fit_config.milestones,
            fit_config.gamma,
        )

    test_logits = test_labels = val_logits = val_labels = None
    for epoch in range(start_epoch, fit_config.epochs):
        started = time.perf_counter()
        params = None if epoch_views is None else epoch_views(epoch)
        batches = progress(
            train_loader,
            desc=f"{desc} epoch {epoch + 1}/{fit_config.epochs}",
            total=steps_per_epoch,
            unit="img",
            unit_scale=fit_config.batch_size,
            log=logger if ranks.main else logging.getLogger(f"{__name__}.rank"),
        )
        train_loss, seen, step = train_epoch(
            net,
            batches,
            optimizer,
            loss_fn=loss_fn,
            prepare=functools.partial(prepare, epoch=epoch, params=params),
            lr_at=lr_at,
            step=step,
            device=device,
            explain=explain,
            precision=precision,
        )
        if ranks.distributed:  # the epoch's loss and images over every rank's share
            shares = gather(ranks, (train_loss * seen, seen))
            seen = sum(n for _, n in shares)
            train_loss = sum(total for total, _ in shares) / max(seen, 1)
        train_s = time.perf_counter() - started
        if not ranks.main:
            elapsed_s += train_s
            train_time_s += train_s
            train_seen += seen
            continue
        if val_loader is not None:
            val_logits, val_labels = predict(model, val_loader, num_val, mean, std, device)
        test_logits, test_labels = predict(model, test_loader, num_test, mean, std, device)
        epoch_s = time.perf_counter() - started
        elapsed_s += epoch_s
        train_time_s += train_s
        train_seen += seen
        row = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 6),
            **(
                {}
                if val_logits is None or val_labels is None
                else {
                    "val_top1": topk_accuracy(val_logits, val_labels, 1),
                    "val_top5": topk_accuracy(val_logits, val_labels, 5),
                }
            ),
            "test_top1": topk_accuracy(test_logits, test_labels, 1),
            "test_top5": topk_accuracy(test_logits, test_labels, 5),
            "lr": lr_at(step - 1),
            "elapsed_s": round(elapsed_s, 3),
        }
        curve.append(row)
        logger.info(
            "%s epoch %d/%d: loss %.4f, test top-1 %.4f, %.0f img/s",
            desc,
            epoch + 1,
            fit_config.epochs,
            train_loss,
            row["test_top1"],
            seen / max(train_s, 1e-9),
        )
        if state_path is not None:
            buffer = io.BytesIO()
            torch.save(
                {
                    "run_key": run_key,
                    "epoch": epoch + 1,
                    "step": step,
                    "curve": curve,
                    "elapsed_s": elapsed_s,
                    "train_time_s": train_time_s,
                    "train_seen": train_seen,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    **({"scaler": precision.state_dict()} if precision.scaler is not None else {}),
                },
                buffer,
            )
            atomic_write_bytes(state_path, buffer.getvalue())
        if on_epoch is not None:
            on_epoch(row)
    if test_logits is None and ranks.main:  # resumed after the last epoch: evaluate the restored weights
        test_logits, test_labels = predict(model, test_loader, num_test, mean, std, device)
        if val_loader is not None:
            val_logits, val_labels = predict(model, val_loader, num_val, mean, std, device)
    result = {
        "curve": curve,
        "wall_s": elapsed_s,
        "images_per_s": train_seen / max(train_time_s, 1e-9),
        "test_logits": test_logits,
        "test_labels": test_labels,
    }
    if val_loader is not None:
        result.update(val_logits=val_logits, val_labels=val_labels)
    return result

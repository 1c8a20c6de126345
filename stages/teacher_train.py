"""Stage `teacher_train`: train one teacher with cross-entropy, or take a given checkpoint.

Writes `checkpoints/teachers/<name>.pt` (format: stages.training, with the resolved teacher and
data configuration), `metrics/teachers/<name>.json` (numbers only: train/val/test top-1, wall
time, images/s), `metrics/teachers/<name>-config.json` (name, architecture, checkpoint sha256,
resolved configuration, split sizes) and the per-epoch curve `metrics/teachers/<name>-curve.json`
(a DVC plot). With a `val` split the teacher trains on `train` only and is evaluated on `val`
and `test` after every epoch.
Training: SGD with Nesterov momentum and weight decay, cosine or step schedule per step, keyed
pad-4 crop + flip augmentation (flip only below 32x32), He et al. 2016's CIFAR recipe.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

import nets
from stages.training import (
    Fit,
    channel_stats,
    check_batch_size,
    config_path,
    data_record,
    dataset_record,
    explain_cross_entropy,
    fit,
    load_checkpoint,
    owns_outputs,
    predict,
    save_checkpoint,
    topk_accuracy,
    training_state_path,
)
from storage.atomic import atomic_write_json
from storage.beton import make_loader
from storage.manifest import read_prepared

if TYPE_CHECKING:
    from pipeline.config import DataConfig, TeacherConfig

logger = logging.getLogger(__name__)


@owns_outputs
def run(
    config: TeacherConfig,
    *,
    name: str,
    data_dir: str | Path,
    checkpoint_out: str | Path,
    metrics_out: str | Path,
    curve_out: str | Path,
    device: torch.device,
    resume: bool = True,
    data_config: DataConfig | None = None,
) -> dict[str, Any]:
    """Train (or load) teacher `name` and write its checkpoint, metrics and config record.

    Args:
        config: TeacherConfig. data_dir: the prepared dataset folder.
        checkpoint_out / metrics_out / curve_out: output files (written atomically); the config
            record goes to `config_path(metrics_out)`.
        device: where to train. resume: continue from `<checkpoint_out>.state` when it was saved
            by the same teacher settings on the same data (the default; otherwise start afresh).
        data_config: the DataConfig used (recorded; default: the manifest's record).
    Returns:
        the metrics dict (numbers only).
    Raises:
        ManifestError: the dataset is not prepared or its betons changed.
        CheckpointError: a given checkpoint does not fit the architecture or dataset.
        UnknownArchitectureError: `config.arch` is not registered.
    """
    manifest = read_prepared(data_dir)
    data_dir, checkpoint_out = Path(data_dir), Path(checkpoint_out)
    height, _, channels = manifest["image_shape"]
    num_train = manifest["splits"]["train"]["num_samples"]
    if config.checkpoint is None:
        check_batch_size(config.batch_size, num_train, f"teacher_train.teachers.{name}")
    num_test = manifest["splits"]["test"]["num_samples"]
    num_val = manifest["splits"]["val"]["num_samples"] if "val" in manifest["splits"] else 0
    mean, std = channel_stats(manifest, device)
    eval_loader = lambda split: make_loader(  # noqa: E731
        data_dir / f"{split}.beton", batch_size=512, shuffle=False
    )
    curve: list[dict[str, Any]] = []
    if config.checkpoint is not None:
        model, _ = load_checkpoint(config.checkpoint, arch=config.arch, manifest=manifest)
        model.to(device)
        test_logits, test_labels = predict(model, eval_loader("test"), num_test, mean, std, device)
        if num_val:
            val_logits, val_labels = predict(model, eval_loader("val"), num_val, mean, std, device)
        wall_s, images_per_s, epochs = 0.0, 0.0, 0
        logger.info("teacher %s: loaded %s instead of training", name, config.checkpoint)
    else:
        torch.manual_seed(config.seed)
        model = nets.build_net(
            config.arch, manifest["num_classes"], in_channels=channels, image_size=height
        ).to(device)
        fit_config = Fit(
            epochs=config.epochs,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            schedule=config.schedule,
            milestones=config.milestones,
            gamma=config.gamma,
            seed=config.seed,
            augment=config.augment,
            image_shape=tuple(manifest["image_shape"]),
            batch_size=config.batch_size,
        )
        train_loader = make_loader(
            data_dir / "train.beton",
            batch_size=config.batch_size,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
        )
        state_path = training_state_path(checkpoint_out)
        result = fit(
            model,
            fit_config,
            train_loader=train_loader,
            test_loader=eval_loader("test"),
            num_train=num_train,
            num_test=num_test,
            mean=mean,
            std=std,
            device=device,
            loss_fn=lambda logits, labels, _index: F.cross_entropy(logits, labels),
            state_path=state_path,
            resume=resume,
            desc=f"teacher {name}",
            val_loader=eval_loader("val") if num_val else None,
            num_val=num_val,
            run_key=f"{config!r}|{manifest['splits']['train']['fingerprint']}",
            explain=explain_cross_entropy(
                "teacher",
                f"teacher_train.teachers.{name}.lr (now {config.lr:g}) or its "
                f"weight_decay (now {config.weight_decay:g})",
            ),
        )
        test_logits, test_labels = result["test_logits"], result["test_labels"]
        if num_val:
            val_logits, val_labels = result["val_logits"], result["val_labels"]
        curve, wall_s, images_per_s, epochs = (
            result["curve"],
            result["wall_s"],
            result["images_per_s"],
            config.epochs,
        )
    train_logits, train_labels = predict(model, eval_loader("train"), num_train, mean, std, device)
    recipe = {
        "teacher": name,
        "config": dataclasses.asdict(config),
        "data": data_record(manifest, data_config),
    }
    sha256 = save_checkpoint(checkpoint_out, model, arch=config.arch, manifest=manifest, extra=recipe)
    metrics = {
        "epochs": epochs,
        "train_top1": topk_accuracy(train_logits, train_labels, 1),
        **(
            {
                "val_top1": topk_accuracy(val_logits, val_labels, 1),
                "val_top5": topk_accuracy(val_logits, val_labels, 5),
            }
            if num_val
            else {}
        ),
        "test_top1": topk_accuracy(test_logits, test_labels, 1),
        "test_top5": topk_accuracy(test_logits, test_labels, 5),
        "wall_s": round(wall_s, 2),
        "images_per_s": round(images_per_s, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    record = {**recipe, "arch": config.arch, "checkpoint_sha256": sha256, "dataset": dataset_record(manifest)}
    atomic_write_json(curve_out, curve)
    atomic_write_json(config_path(metrics_out), record)
    atomic_write_json(metrics_out, metrics)
    if config.checkpoint is None:
        training_state_path(checkpoint_out).unlink(missing_ok=True)
    logger.info("teacher %s: test top-1 %.4f (train %.4f)", name, metrics["test_top1"], metrics["train_top1"])
    return metrics

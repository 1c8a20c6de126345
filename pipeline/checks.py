"""What `lessons check-params` checks beyond the config itself: the files and devices that
params.yaml points at exist here, before `dvc repro` deletes any stage's old outputs."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError, Params
from pipeline.datasets import DatasetError, check_layout, count_classes, default_root


def check_environment(params: Params) -> None:
    """Refuse a params.yaml that cannot run on this machine, with one line naming the key.

    Checks: at least one teacher and one student experiment (dvc's matrix stages need them);
    the dataset root (`data.root` or the dataset's default) exists, with the files and folders
    of its layout for `cifar100`, `cinic10` and `tinyimagenet` (`check_layout`); every teacher
    `checkpoint:` file exists; no `device: cuda` without a visible CUDA device; no `nproc` above
    the CUDA devices (a CUDA job) or CPU cores (a CPU one) of this host; with
    `teacher_dump.layout: topk`, K is below the dataset's class count C.

    Raises:
        ConfigError: the first problem found.
    """
    if not params.teacher_train.teachers:
        raise ConfigError(
            "teacher_train.teachers: no teacher is defined (is params.yaml empty?); add one, "
            "e.g. teachers: {cnn_small: {arch: cnn_small}}"
        )
    if not params.student_train.experiments:
        raise ConfigError(
            "student_train.experiments: no experiment is defined; add one, "
            "e.g. experiments: {ce: {kd: false}}"
        )
    try:
        default_root(params.data.name)  # raises for an unknown name, with the closest known one
    except DatasetError as exc:
        raise ConfigError(f"data.name: {exc}") from exc
    try:
        check_layout(params.data)  # the root exists and, for a fixed layout, its files do
    except DatasetError as exc:
        raise ConfigError(f"data.root: {exc}") from exc
    dump = params.teacher_dump
    if dump.layout == "topk" and dump.topk is not None:
        try:
            num_classes = count_classes(params.data)
        except DatasetError as exc:
            raise ConfigError(f"data.root: {exc}") from exc
        if dump.topk >= num_classes:
            raise ConfigError(
                f"teacher_dump.topk: K = {dump.topk} but {params.data.name} has C = {num_classes} "
                "classes; a top-k store keeps K < C of them: lower topk, or use layout: dense"
            )
    for name, teacher in params.teacher_train.teachers.items():
        if teacher.checkpoint is not None and not Path(teacher.checkpoint).expanduser().is_file():
            shown = Path(teacher.checkpoint)
            shown_text = shown if shown.is_absolute() else f"{shown} (from {Path.cwd()})"
            raise ConfigError(
                f"teacher_train.teachers.{name}.checkpoint: {shown_text} is not a file; give "
                "an existing checkpoint, or null to train the teacher"
            )
    devices = {
        f"teacher_train.teachers.{name}.device": t.device for name, t in params.teacher_train.teachers.items()
    }
    devices |= {
        "teacher_dump.device": params.teacher_dump.device,
        "student_train.device": params.student_train.device,
    }
    cuda_keys = [key for key, device in devices.items() if device == "cuda"]
    if cuda_keys:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"{cuda_keys[0]}: cuda, but no CUDA device is visible on this machine; use auto "
                "(CUDA when present, else CPU) or cpu"
            )
    from pipeline.launch import LaunchError, check_nproc
    from pipeline.seeding import resolve_device

    ranks = (
        ("teacher_dump.nproc", params.teacher_dump.nproc, params.teacher_dump.device),
        ("student_train.nproc", params.student_train.nproc, params.student_train.device),
    )
    for key, nproc, device in ranks:
        if nproc > 1:
            try:
                check_nproc(nproc, resolve_device(device), key=key)
            except LaunchError as exc:
                raise ConfigError(str(exc)) from exc

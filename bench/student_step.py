"""Student training steps: precomputed KA+DTD lessons vs plain CE vs online KD, images/s.

Every contender runs `stages.training.train_epoch` (the trainer's step loop) over the same
stream of batches from the project's ffcv loader (`storage.beton.make_loader`, batch 128,
shuffled, 2 workers, as `student_train` builds it), with the same keyed augmentation
(`Augmentation.draw` + `apply`) and normalisation, the same SGD, a fresh student each:

  ce         plain cross-entropy (what `student_train` uses without a teacher);
  lessons    `kd_batch_loss`, PS-adjusted targets and raw teacher logits gathered by
             sample_index from tensors in memory, DTD flsw (what `student_train` runs for kd_ps_flsw);
  online_T   the teacher T forward under no_grad inside the loop, PS applied to its logits, then the
             very same `kd_batch_loss` on them (written into in-memory tables, then gathered);
  forward_T  the teacher forward alone on one prepared batch (F), repeated.

Figures (per repetition, side by side): lessons/ce (target ≥ 0.95); lessons/online (target
≥ 0.9 × limit) with limit = (S + F)/S, S the time of a ce step and F a teacher forward.
Teachers are random-init (timing only).

    python -m bench.student_step [--quick] [--reps N] [--out FILE]
"""
from __future__ import annotations

import functools
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

NAME = "student_step"
BATCH = 128
ALPHA = 0.9
TARGET_CE = 0.95
TARGET_LIMIT = 0.9


def _setups(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"dataset": "fashion_mnist", "student": "cnn_tiny", "teachers": ["cnn_small"],
                 "num_samples": 1024, "steps": 3, "warmup_steps": 1, "reps": 1}]
    return [
        # Many short repetitions: on 2 shared cores the load from other jobs swings by ±30 % over
        # seconds, and the median of many side-by-side ratios is what stays put.
        {"dataset": "fashion_mnist", "student": "cnn_tiny", "teachers": ["cnn_small"],
         "num_samples": 8192, "steps": 10, "warmup_steps": 3, "reps": 12},
        {"dataset": "cifar10", "student": "resnet20", "teachers": ["resnet56", "resnet110"],
         "num_samples": 4096, "steps": 3, "warmup_steps": 1, "reps": 6},
    ]


def _stream(loader: Any) -> Iterator[Any]:
    """Batches of successive epochs, without end (every contender draws from the same stream)."""
    while True:
        yield from loader


def bench_setup(setup: dict[str, Any], reps: int, work: Path) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import nets
    from pipeline.config import TemperatureConfig
    from stages.adjust import knowledge_adjustment
    from stages.student_train import Lessons, kd_batch_loss
    from stages.training import Fit, channel_stats, normalize, sgd, train_epoch
    from storage.beton import make_loader

    data_config = (common.fashion_mnist if setup["dataset"] == "fashion_mnist" else common.cifar10)(
        setup["num_samples"], 256)
    data_dir = work / setup["dataset"]
    dataset, manifest = common.prepare(data_config, data_dir)
    common.ready_torch()
    device = torch.device("cpu")
    image_shape = tuple(manifest["image_shape"])
    height, _, channels = image_shape
    num_classes, num_train = manifest["num_classes"], manifest["splits"]["train"]["num_samples"]
    mean, std = channel_stats(manifest, device)
    augmentation = Fit(epochs=1, lr=0.05, momentum=0.9, weight_decay=5e-4, image_shape=image_shape,
                       batch_size=BATCH).augmentation
    loader = make_loader(data_dir / "train.beton", batch_size=BATCH, shuffle=True,
                         seed=0, drop_last=True, num_workers=2)
    stream = _stream(loader)
    temperature_config = TemperatureConfig()
    labels_table = torch.from_numpy(dataset.train.labels.astype("int64"))

    def prepare(images: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        return normalize(augmentation.apply(images, augmentation.draw(0, 0, sample_index.numpy())[1]), mean, std)

    # Precomputed lessons: PS-adjusted targets and raw teacher logits, (N, C) float32 in memory.
    generator = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(num_train, num_classes, generator=generator) * 3.0
    lessons = Lessons(target_logits=knowledge_adjustment(teacher_logits, labels_table, "ps").target_logits,
                      fixed_target=torch.zeros(num_train, dtype=torch.bool),
                      teacher_logits=teacher_logits, static_temperature=None)

    def student() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nets.build_net(setup["student"], num_classes, in_channels=channels, image_size=height)
        return model, sgd(model, 0.05, 0.9, 5e-4)

    def kd_loss_with(table: Lessons) -> Callable[..., torch.Tensor]:
        return lambda logits, labels, index: kd_batch_loss(
            logits, labels, index, lessons=table, alpha=ALPHA, dtd="flsw",
            temperature_config=temperature_config)

    def step_contender(loss_fn: Callable[..., torch.Tensor],
                       prepare_fn: Callable[..., torch.Tensor] = prepare) -> Callable[[int], float]:
        model, optimizer = student()

        def run(steps: int) -> float:
            started = time.perf_counter()
            _, seen, _ = train_epoch(model, itertools.islice(stream, steps), optimizer, loss_fn=loss_fn,
                                     prepare=prepare_fn, lr_at=lambda _s: 0.05, step=0, device=device)
            return seen / (time.perf_counter() - started)
        return run

    runs: dict[str, Callable[[int], float]] = {
        "ce": step_contender(lambda logits, labels, _index: F.cross_entropy(logits, labels)),
        "lessons": step_contender(kd_loss_with(lessons)),
    }
    sample_batch = prepare(*(lambda b: (b[0].clone(), b[2].clone()))(next(stream)))
    for name in setup["teachers"]:
        torch.manual_seed(1)
        teacher = nets.build_net(name, num_classes, in_channels=channels, image_size=height).eval()
        online = Lessons(target_logits=torch.zeros(num_train, num_classes),
                         fixed_target=torch.zeros(num_train, dtype=torch.bool),
                         teacher_logits=torch.zeros(num_train, num_classes), static_temperature=None)

        def prepare_online(images: torch.Tensor, sample_index: torch.Tensor, teacher=teacher,
                           online=online) -> torch.Tensor:
            inputs = prepare(images, sample_index)
            with torch.no_grad():
                logits = teacher(inputs)
                online.teacher_logits[sample_index] = logits
                online.target_logits[sample_index] = knowledge_adjustment(
                    logits, labels_table[sample_index], "ps").target_logits
            return inputs

        def forward_only(steps: int, teacher=teacher) -> float:
            started = time.perf_counter()
            with torch.no_grad():
                for _ in range(steps):
                    teacher(sample_batch)
            return steps * BATCH / (time.perf_counter() - started)

        runs[f"online_{name}"] = step_contender(kd_loss_with(online), prepare_online)
        runs[f"forward_{name}"] = forward_only

    steps, warm = setup["steps"], setup["warmup_steps"]
    print(f"{setup['dataset']} {'/'.join(setup['teachers'])} -> {setup['student']}: {steps} steps of "
          f"{BATCH} per repetition, torch threads {torch.get_num_threads()}")
    samples = common.interleave({k: functools.partial(f, steps) for k, f in runs.items()}, reps,
                                warmup={k: functools.partial(f, warm) for k, f in runs.items()})
    ce, kd = samples["ce"], samples["lessons"]
    result: dict[str, Any] = {
        "dataset": setup["dataset"], "student": setup["student"], "num_samples": num_train,
        "batch_size": BATCH, "steps_per_rep": steps, "reps": reps, "dtd": "flsw", "adjust": "ps",
        "images_per_s": {name: common.summary(values) for name, values in samples.items()},
        "lessons_over_ce": common.ratio_summary(kd, ce), "target_lessons_over_ce": TARGET_CE,
        "teachers": {},
    }
    result["verdict_lessons_over_ce"] = common.verdict(result["lessons_over_ce"]["median"], TARGET_CE)
    print(f"  lessons/ce {common.fmt(result['lessons_over_ce'])} (target >= {TARGET_CE}: "
          f"{result['verdict_lessons_over_ce']})")
    for name in setup["teachers"]:
        online_rates, forward_rates = samples[f"online_{name}"], samples[f"forward_{name}"]
        # S, F: seconds per batch of a ce step and of a teacher forward, same repetition.
        limit = [(BATCH / c + BATCH / f) / (BATCH / c) for c, f in zip(ce, forward_rates, strict=True)]
        over_online = [k / o for k, o in zip(kd, online_rates, strict=True)]
        of_limit = [r / m for r, m in zip(over_online, limit, strict=True)]
        entry: dict[str, Any] = {"lessons_over_online": common.summary(over_online), "limit": common.summary(limit),
                 "fraction_of_limit": common.summary(of_limit), "target_fraction_of_limit": TARGET_LIMIT}
        entry["verdict"] = common.verdict(entry["fraction_of_limit"]["median"], TARGET_LIMIT)
        result["teachers"][name] = entry
        print(f"  {name}: lessons/online {common.fmt(entry['lessons_over_online'])}, limit (S+F)/S "
              f"{common.fmt(entry['limit'])}, fraction of limit {common.fmt(entry['fraction_of_limit'])} "
              f"(target >= {TARGET_LIMIT}: {entry['verdict']})")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    started = time.perf_counter()
    with common.tempdir(NAME) as tmp:
        results = [bench_setup(setup, args.reps or setup["reps"], Path(tmp) / str(i))
                   for i, setup in enumerate(_setups(args.quick))]
    result = {"quick": args.quick, "setups": results}
    common.write_result(NAME, result, args.out, started)
    return result


if __name__ == "__main__":
    common.main_guard(main)

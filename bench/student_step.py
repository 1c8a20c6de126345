"""Student training steps: precomputed KA+DTD lessons vs plain CE vs online KD, images/s.

Every contender runs `stages.training.train_epoch` (the trainer's step loop) over the same
stream of batches from the project's ffcv loader (`storage.beton.make_loader`, batch 128,
shuffled, 2 workers, as `student_train` builds it), with the same keyed augmentation
(`Augmentation.draw` + `apply`) and normalisation, the same SGD, a fresh student each:

  ce         plain cross-entropy (what `student_train` uses without a teacher);
  lessons    `kd_batch_loss`, PS-adjusted targets and raw teacher logits gathered by
             sample_index from (N, C) tensors in memory, DTD flsw (a `views: none` store, V = 1);
  lessons_views  the same loss on a `views: all` store (V = 162 for CIFAR, 2 for Fashion-MNIST), read
             as `student_train` reads it: a (V, N, C) float16 `logits.zarr` (synthetic teacher rows,
             written through `StoreWriter`) and its `adjusted-ps.zarr` from the real `stages.adjust.run`,
             opened with `open_lessons` (in memory); each repetition first gathers one epoch
             (`LessonStores.epoch(seed, epoch)`: the drawn view's targets and params of every sample,
             a new epoch each time), then trains on the drawn views' images (`params[sample_index]`
             through `Augmentation.apply`, as `fit` does). The gather is timed on its own and
             charged to the contender pro rata: gather_s × steps / (steps per epoch);
  gather_streamed  the same epoch gather from the same stores opened streamed (max_bytes 0), alone;
  online_T   `OnlineTeacher` (the trainer's `teacher_mode: online`) on a saved random-init checkpoint
             of T: `observe` on every prepared batch, then `kd_batch_loss` on `lessons(labels)`;
  forward_T  the teacher forward alone on one prepared batch (F), repeated.

Figures (per repetition, side by side): lessons/ce and lessons_views/ce (target ≥ 0.95);
lessons/online and lessons_views/online (target ≥ 0.9 × limit) with limit = (S + F)/S, S the
time of a ce step and F a teacher forward. Teachers are random-init (timing only).

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
        return [
            {
                "dataset": "fashion_mnist",
                "student": "cnn_tiny",
                "teachers": ["cnn_small"],
                "num_samples": 1024,
                "steps": 3,
                "warmup_steps": 1,
                "reps": 1,
            }
        ]
    return [
        # Many short repetitions: on 2 shared cores the load from other jobs swings by ±30 % over
        # seconds, and the median of many side-by-side ratios is what stays put.
        {
            "dataset": "fashion_mnist",
            "student": "cnn_tiny",
            "teachers": ["cnn_small"],
            "num_samples": 8192,
            "steps": 10,
            "warmup_steps": 3,
            "reps": 12,
        },
        {
            "dataset": "cifar10",
            "student": "resnet20",
            "teachers": ["resnet56", "resnet110"],
            "num_samples": 4096,
            "steps": 3,
            "warmup_steps": 1,
            "reps": 6,
        },
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
    from stages.lessons import open_lessons
    from stages.student_train import Lessons, OnlineTeacher, kd_batch_loss
    from stages.training import Fit, channel_stats, normalize, save_checkpoint, sgd, train_epoch
    from storage.beton import make_loader

    data_config = (common.fashion_mnist if setup["dataset"] == "fashion_mnist" else common.cifar10)(
        setup["num_samples"], 256
    )
    data_dir = work / setup["dataset"]
    dataset, manifest = common.prepare(data_config, data_dir)
    common.ready_torch()
    device = torch.device("cpu")
    image_shape = tuple(manifest["image_shape"])
    height, _, channels = image_shape
    num_classes, num_train = manifest["num_classes"], manifest["splits"]["train"]["num_samples"]
    mean, std = channel_stats(manifest, device)
    augmentation = Fit(
        epochs=1, lr=0.05, momentum=0.9, weight_decay=5e-4, image_shape=image_shape, batch_size=BATCH
    ).augmentation
    loader = make_loader(
        data_dir / "train.beton", batch_size=BATCH, shuffle=True, seed=0, drop_last=True, num_workers=2
    )
    stream = _stream(loader)
    temperature_config = TemperatureConfig()
    labels_table = torch.from_numpy(dataset.train.labels.astype("int64"))

    def prepare(images: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        return normalize(
            augmentation.apply(images, augmentation.draw(0, 0, sample_index.numpy())[1]), mean, std
        )

    # Precomputed lessons: PS-adjusted targets and raw teacher logits, (N, C) float32 in memory.
    generator = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(num_train, num_classes, generator=generator) * 3.0
    lessons = Lessons(
        target_logits=knowledge_adjustment(teacher_logits, labels_table, "ps").target_logits,
        fixed_target=torch.zeros(num_train, dtype=torch.bool),
        teacher_logits=teacher_logits,
        static_temperature=None,
    )

    # A `views: all` store (V, N, C) and its KA store, opened as student_train opens them.
    store_dir = work / "stores" / "teacher"
    write_views_store(store_dir / "logits.zarr", manifest, dataset.train.labels, augmentation)
    tick = time.perf_counter()
    _adjust(store_dir)
    adjust_s = time.perf_counter() - tick
    opened = {
        mode: open_lessons(
            store_dir,
            adjust="ps",
            dtd="flsw",
            manifest=manifest,
            augmentation=augmentation,
            max_bytes=max_bytes,
            device=device,
        )[0]
        for mode, max_bytes in (("memory", 4 * 1024**3), ("streamed", 0))
    }
    assert not opened["memory"].streamed and opened["streamed"].streamed
    num_views = opened["memory"].num_views
    steps_per_epoch = num_train // BATCH
    epochs = itertools.count()

    def student() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nets.build_net(setup["student"], num_classes, in_channels=channels, image_size=height)
        return model, sgd(model, 0.05, 0.9, 5e-4)

    def kd_loss_with(table: Lessons) -> Callable[..., torch.Tensor]:
        return lambda logits, labels, index: kd_batch_loss(
            logits,
            labels,
            index,
            lessons=table,
            alpha=ALPHA,
            dtd="flsw",
            temperature_config=temperature_config,
        )

    def step_contender(
        loss_fn: Callable[..., torch.Tensor], prepare_fn: Callable[..., torch.Tensor] = prepare
    ) -> Callable[[int], float]:
        model, optimizer = student()

        def run(steps: int) -> float:
            started = time.perf_counter()
            _, seen, _ = train_epoch(
                model,
                itertools.islice(stream, steps),
                optimizer,
                loss_fn=loss_fn,
                prepare=prepare_fn,
                lr_at=lambda _s: 0.05,
                step=0,
                device=device,
            )
            return seen / (time.perf_counter() - started)

        return run

    def lessons_views_contender() -> Callable[[int], dict[str, float]]:
        model, optimizer = student()
        current: dict[str, Any] = {}

        def prepare_views(images: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
            # fit's prepare with a multi-view store: the epoch's view params of each sample
            return normalize(augmentation.apply(images, current["params"][sample_index.numpy()]), mean, std)

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return kd_batch_loss(
                logits,
                labels,
                index,
                lessons=current["lessons"],
                alpha=ALPHA,
                dtd="flsw",
                temperature_config=temperature_config,
            )

        def run(steps: int) -> dict[str, float]:
            tick = time.perf_counter()
            current["lessons"], current["params"] = opened["memory"].epoch(0, next(epochs))
            gather_s = time.perf_counter() - tick
            started = time.perf_counter()
            _, seen, _ = train_epoch(
                model,
                itertools.islice(stream, steps),
                optimizer,
                loss_fn=loss_fn,
                prepare=prepare_views,
                lr_at=lambda _s: 0.05,
                step=0,
                device=device,
            )
            step_s = time.perf_counter() - started
            charged = gather_s * steps / steps_per_epoch
            return {
                "images_per_s": seen / (step_s + charged),
                "steps_only_images_per_s": seen / step_s,
                "gather_s": gather_s,
                "gather_charged_s": charged,
                "step_s": step_s,
            }

        return run

    def gather_streamed(_steps: int) -> float:
        tick = time.perf_counter()
        opened["streamed"].epoch(0, next(epochs))
        return time.perf_counter() - tick

    runs: dict[str, Callable[[int], Any]] = {
        "ce": step_contender(lambda logits, labels, _index: F.cross_entropy(logits, labels)),
        "lessons": step_contender(kd_loss_with(lessons)),
        "lessons_views": lessons_views_contender(),
        "gather_streamed": gather_streamed,
    }
    sample_batch = prepare(*(lambda b: (b[0].clone(), b[2].clone()))(next(stream)))
    for name in setup["teachers"]:
        torch.manual_seed(1)
        checkpoint = work / f"{name}.pt"
        save_checkpoint(
            checkpoint,
            nets.build_net(name, num_classes, in_channels=channels, image_size=height),
            arch=name,
            manifest=manifest,
        )
        online = OnlineTeacher(checkpoint, manifest=manifest, method="ps", epsilon=0.1, device=device)
        teacher = online.model

        def prepare_online(images: torch.Tensor, sample_index: torch.Tensor, online=online) -> torch.Tensor:
            inputs = prepare(images, sample_index)  # fit: the keyed draw, then on_inputs
            online.observe(inputs)
            return inputs

        def online_loss(
            logits: torch.Tensor, labels: torch.Tensor, _index: torch.Tensor, online=online
        ) -> torch.Tensor:  # student_train's batch_lessons with a teacher online
            return kd_batch_loss(
                logits,
                labels,
                torch.arange(labels.shape[0]),
                lessons=online.lessons(labels),
                alpha=ALPHA,
                dtd="flsw",
                temperature_config=temperature_config,
            )

        def forward_only(steps: int, teacher=teacher) -> float:
            started = time.perf_counter()
            with torch.no_grad():
                for _ in range(steps):
                    teacher(sample_batch)
            return steps * BATCH / (time.perf_counter() - started)

        runs[f"online_{name}"] = step_contender(online_loss, prepare_online)
        runs[f"forward_{name}"] = forward_only

    steps, warm = setup["steps"], setup["warmup_steps"]
    print(
        f"{setup['dataset']} {'/'.join(setup['teachers'])} -> {setup['student']}: {steps} steps of "
        f"{BATCH} per repetition ({steps_per_epoch} per epoch), V = {num_views}, torch threads "
        f"{torch.get_num_threads()}"
    )
    samples = common.interleave(
        {k: functools.partial(f, steps) for k, f in runs.items()},
        reps,
        warmup={k: functools.partial(f, warm) for k, f in runs.items()},
    )
    views_runs = samples.pop("lessons_views")
    streamed_s = samples.pop("gather_streamed")
    samples["lessons_views"] = [r["images_per_s"] for r in views_runs]
    ce = samples["ce"]
    contenders = {
        "lessons": samples["lessons"],
        "lessons_views": samples["lessons_views"],
        # the same steps with the streamed gather charged instead of the in-memory one
        "lessons_views_streamed": [
            BATCH * steps / (r["step_s"] + g * steps / steps_per_epoch)
            for r, g in zip(views_runs, streamed_s, strict=True)
        ],
    }
    result: dict[str, Any] = {
        "dataset": setup["dataset"],
        "student": setup["student"],
        "num_samples": num_train,
        "batch_size": BATCH,
        "steps_per_rep": steps,
        "steps_per_epoch": steps_per_epoch,
        "reps": reps,
        "dtd": "flsw",
        "adjust": "ps",
        "num_views": num_views,
        "images_per_s": {name: common.summary(values) for name, values in samples.items()},
        "lessons_views_steps_only_images_per_s": common.summary(
            [r["steps_only_images_per_s"] for r in views_runs]
        ),
        "gather_epoch_s": {
            "memory": common.summary([r["gather_s"] for r in views_runs]),
            "streamed": common.summary(streamed_s),
        },
        "gather_share_of_epoch": common.summary(
            [r["gather_s"] / (r["gather_s"] + r["step_s"] * steps_per_epoch / steps) for r in views_runs]
        ),
        "adjust_store_s": adjust_s,
        "target_lessons_over_ce": TARGET_CE,
        "teachers": {},
    }
    for key, values in contenders.items():
        result[f"{key}_over_ce"] = common.ratio_summary(values, ce)
        result[f"verdict_{key}_over_ce"] = common.verdict(result[f"{key}_over_ce"]["median"], TARGET_CE)
        print(
            f"  {key}/ce {common.fmt(result[f'{key}_over_ce'])} (target >= {TARGET_CE}: "
            f"{result[f'verdict_{key}_over_ce']})"
        )
    print(
        f"  epoch gather (V = {num_views}, N = {num_train}): in memory "
        f"{common.fmt(result['gather_epoch_s']['memory'])} s, "
        f"streamed {common.fmt(result['gather_epoch_s']['streamed'])} s; share of an in-memory epoch "
        f"{common.fmt(result['gather_share_of_epoch'])}"
    )
    for name in setup["teachers"]:
        online_rates, forward = samples[f"online_{name}"], samples[f"forward_{name}"]
        # S, F: seconds per batch of a ce step and of a teacher forward, same repetition.
        limit = [(BATCH / c + BATCH / f) / (BATCH / c) for c, f in zip(ce, forward, strict=True)]
        entry: dict[str, Any] = {"limit": common.summary(limit), "target_fraction_of_limit": TARGET_LIMIT}
        for key in ("lessons", "lessons_views"):
            over_online = [k / o for k, o in zip(contenders[key], online_rates, strict=True)]
            of_limit = [r / m for r, m in zip(over_online, limit, strict=True)]
            prefix = "" if key == "lessons" else "views_"
            entry[f"{prefix}lessons_over_online"] = common.summary(over_online)
            entry[f"{prefix}fraction_of_limit"] = common.summary(of_limit)
            entry[f"{prefix}verdict"] = common.verdict(
                entry[f"{prefix}fraction_of_limit"]["median"], TARGET_LIMIT
            )
            print(
                f"  {name}: {key}/online {common.fmt(entry[f'{prefix}lessons_over_online'])}, limit (S+F)/S "
                f"{common.fmt(entry['limit'])}, fraction of limit "
                f"{common.fmt(entry[f'{prefix}fraction_of_limit'])} "
                f"(target >= {TARGET_LIMIT}: {entry[f'{prefix}verdict']})"
            )
        result["teachers"][name] = entry
    return result


def write_views_store(
    path: Path, manifest: dict[str, Any], labels: Any, augmentation: Any, chunk_rows: int = 16384
) -> None:
    """A `views: all` teacher logit store for the prepared dataset of `manifest`, as `teacher_dump`
    lays it out ((V, N, C) float16 logits, (V, N, P) view params, the same attributes), with
    synthetic rows: N(0, 3) noise plus 6 at the label for 80 % of (v, n) (timing only)."""
    import numpy as np

    from stages.teacher_dump import store_attrs
    from stages.views import StoredViews
    from storage import ArraySpec, StoreWriter

    views = StoredViews.plan("all", augmentation)
    num_views, num_classes = views.num_views, manifest["num_classes"]
    num_samples = manifest["splits"]["train"]["num_samples"]
    arrays = {
        "logits": ArraySpec((num_views, num_samples, num_classes), "float16", sample_axis=1),
        "labels": ArraySpec((num_samples,), "int64"),
        "sample_index": ArraySpec((num_samples,), "int64"),
        "view_params": ArraySpec(
            (num_views, num_samples, len(augmentation.param_names)), "int16", sample_axis=1
        ),
    }
    attrs = store_attrs(
        manifest=manifest,
        split="train",
        teacher="bench",
        checkpoint_meta={"arch": "none"},
        checkpoint_sha256="0" * 64,
        dtype="float16",
        views=views,
    )
    labels = np.asarray(labels, dtype=np.int64)
    with StoreWriter(path, kind="logits", arrays=arrays, attrs=attrs, chunk_rows=chunk_rows) as writer:
        for chunk in writer.pending_chunks():
            rows = writer.rows(chunk)
            rng = np.random.default_rng(np.random.SeedSequence([7, chunk]))
            count = rows.stop - rows.start
            logits = rng.standard_normal((num_views, count, num_classes), dtype=np.float32) * 3.0
            right = rng.random((num_views, count)) < 0.8
            logits[:, np.arange(count), labels[rows]] += 6.0 * right
            writer.write_chunk(
                chunk,
                {
                    "logits": logits.astype(np.float16),
                    "labels": labels[rows],
                    "sample_index": np.arange(rows.start, rows.stop, dtype=np.int64),
                    "view_params": views.view_params(np.arange(rows.start, rows.stop)),
                },
            )
        writer.finalize()


def _adjust(store_dir: Path) -> None:
    """`adjusted-ps.zarr` from `logits.zarr` with the real KA stage."""
    from pipeline.config import AdjustConfig
    from stages import adjust

    adjust.run(
        AdjustConfig(),
        method="ps",
        logits_path=store_dir / "logits.zarr",
        out=store_dir / "adjusted-ps.zarr",
        metrics_out=store_dir / "adjust.json",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    started = time.perf_counter()
    with common.tempdir(NAME) as tmp:
        results = [
            bench_setup(setup, args.reps or setup["reps"], Path(tmp) / str(i))
            for i, setup in enumerate(_setups(args.quick))
        ]
    result = {"quick": args.quick, "setups": results}
    common.write_result(NAME, result, args.out, started)
    return result


if __name__ == "__main__":
    common.main_guard(main)

"""Augmented CIFAR-10 batches: the project's ffcv loader vs a torch DataLoader, images/s.

Contenders, interleaved, each drawing `batches` batches of 128 per repetition from its own
endless stream (shuffled, every epoch):

  ffcv   `storage.beton.make_loader` over the train beton (2 workers, as `student_train` builds
         it) + the keyed augmentation the trainer applies per batch
         (`training_augmentation`'s keyed draw and apply: pad-4 random crop + flip).
  torch  `torch.utils.data.DataLoader` (num_workers=2, persistent workers) over a Dataset of the
         same uint8 (3, 32, 32) images with torchvision `RandomCrop(32, padding=4)` +
         `RandomHorizontalFlip()` per sample.

Both yield uint8 (128, 3, 32, 32) augmented batches and labels. Figure: ffcv ÷ torch
images/s (target ≥ 2).

    python -m bench.loader [--quick] [--reps N] [--out FILE]
"""

from __future__ import annotations

import functools
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

NAME = "loader"
BATCH = 128
TARGET = 2.0


def _endless(make_iterable: Any) -> Iterator[Any]:
    while True:
        yield from make_iterable()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    num_samples, batches = (1024, 4) if args.quick else (20000, 60)
    started = time.perf_counter()
    with common.tempdir(NAME) as tmp:
        result = _run(Path(tmp), num_samples, batches, reps)
    result.update(quick=args.quick, reps=reps)
    common.write_result(NAME, result, args.out, started)
    return result


def _run(work: Path, num_samples: int, batches: int, reps: int) -> dict[str, Any]:
    import torch
    import torchvision.transforms.v2 as T
    from torch.utils.data import DataLoader, Dataset

    from stages.views import training_augmentation
    from storage.beton import make_loader

    dataset, _ = common.prepare(common.cifar10(num_samples, 256), work / "cifar10")
    common.ready_torch()
    images = torch.from_numpy(dataset.train.images).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    labels = torch.from_numpy(dataset.train.labels.astype("int64"))

    class Augmented(Dataset):
        transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])

        def __len__(self) -> int:
            return images.shape[0]

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.transform(images[i]), labels[i]

    loader = make_loader(
        work / "cifar10" / "train.beton",
        batch_size=BATCH,
        shuffle=True,
        seed=0,
        drop_last=True,
        num_workers=2,
    )
    epoch = itertools.count()
    augmentation = training_augmentation((32, 32, 3))

    def ffcv_epoch() -> Iterator[Any]:
        e = next(epoch)
        for batch_images, batch_labels, sample_index in loader:
            yield (
                augmentation.apply(batch_images, augmentation.draw(0, e, sample_index.numpy())[1]),
                batch_labels,
            )

    torch_loader = DataLoader(
        Augmented(), batch_size=BATCH, shuffle=True, num_workers=2, drop_last=True, persistent_workers=True
    )
    streams = {"ffcv": _endless(ffcv_epoch), "torch": _endless(lambda: torch_loader)}

    def draw(name: str, count: int) -> float:
        stream = streams[name]
        started = time.perf_counter()
        seen = 0
        for batch_images, _ in itertools.islice(stream, count):
            assert batch_images.shape == (BATCH, 3, 32, 32) and batch_images.dtype == torch.uint8
            seen += batch_images.shape[0]
        return seen / (time.perf_counter() - started)

    print(
        f"cifar10 N={images.shape[0]}: {batches} batches of {BATCH} per repetition, "
        f"torch threads {torch.get_num_threads()}"
    )
    samples = common.interleave(
        {name: functools.partial(draw, name, batches) for name in streams},
        reps,
        warmup={name: functools.partial(draw, name, 3) for name in streams},
    )
    ratio = common.ratio_summary(samples["ffcv"], samples["torch"])
    result = {
        "dataset": "cifar10",
        "num_samples": int(images.shape[0]),
        "batch_size": BATCH,
        "batches_per_rep": batches,
        "num_workers": 2,
        "images_per_s": {name: common.summary(values) for name, values in samples.items()},
        "ffcv_over_torch": ratio,
        "target": TARGET,
        "verdict": common.verdict(ratio["median"], TARGET),
    }
    print(f"  ffcv/torch {common.fmt(ratio)} (target >= {TARGET}: {result['verdict']})")
    return result


if __name__ == "__main__":
    common.main_guard(main)

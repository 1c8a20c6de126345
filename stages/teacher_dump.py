"""Stage `teacher_dump`: run a teacher once, in eval mode, and store its logits (DESIGN.md §3).

Writes `stores/<teacher>/logits.zarr` (train split) and `stores/<teacher>/test-logits.zarr`
(test split, for agreement metrics): `logits` (V, N, C) — or, with `teacher_dump.layout: topk`,
the train split as `topk_values`/`topk_indices` (V, N, K) and `lse` (V, N) (DESIGN §9; the test
split stays dense) — `labels` (N,), `sample_index` (N,),
`view_params` (V, N, P) and `view_spec`: the views `teacher_dump.views` asks for (DESIGN §5;
`stages.views.StoredViews`), built by the same `Augmentation.apply` the student trains with. The
test split always holds the plain image (V = 1): it is only compared with the student's test
predictions. Each chunk of N rows (all V views of those rows) is forwarded in batches that start
at the chunk's first row, so a resumed dump computes exactly the batches an uninterrupted one
would and the stores are byte-identical.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from stages.distributed import Ranks, barrier, from_main, gather, process_group
from stages.progress import progress
from stages.topk import topk_compress, topk_index_dtype
from stages.training import channel_stats, load_checkpoint, normalize
from stages.views import StoredViews, training_augmentation
from storage import ArraySpec, StoreWriter
from storage.atomic import check_folder_output
from storage.beton import make_loader
from storage.errors import SettingsError
from storage.manifest import file_sha256, read_prepared
from storage.soft_labels import check_values
from storage.versions import library_versions

if TYPE_CHECKING:
    from pipeline.config import TeacherDumpConfig

logger = logging.getLogger(__name__)

VIEW_SPEC = {"kind": "identity", "num_views": 1, "view_param_names": []}  # stores written before views


def stored_views(config: TeacherDumpConfig, image_shape: tuple[int, ...] | list[int]) -> StoredViews:
    """The views a train-split dump holds for `config` (TeacherDumpConfig) and images of `image_shape`.

    Raises:
        ViewError: a view setting the augmentation cannot support (one line naming the key).
    """
    return StoredViews.plan(
        config.views,
        training_augmentation(image_shape),
        num_views=config.num_views,
        seeds=tuple(config.seeds),
        epochs=config.epochs,
        seed=config.seed,
    )


CHUNK_BUFFER_BYTES = 64 * 2**20


def dump_chunk_rows(config: TeacherDumpConfig, num_views: int, num_classes: int) -> int:
    """Rows of N per store chunk: `teacher_dump.chunk_size`, lowered in whole batches so that one
    chunk's float32 logits (V·rows·C·4 bytes, held in memory while it is forwarded) stay within
    64 MiB — a 162-view chunk of 16 384 rows would be 106 MB at C = 10 and 1 GB at C = 100. A pure
    function of the settings, so a resumed dump finds the same chunks; V = 1 stores keep `chunk_size`.
    """
    fit = CHUNK_BUFFER_BYTES // (4 * num_views * num_classes)
    return min(config.chunk_size, max(config.batch_size, fit // config.batch_size * config.batch_size))


def store_attrs(
    *,
    manifest: dict[str, Any],
    split: str,
    teacher: str,
    checkpoint_meta: dict[str, Any],
    checkpoint_sha256: str,
    dtype: str,
    views: StoredViews | None = None,
    autocast: str = "none",
    topk: int | None = None,
) -> dict[str, Any]:
    """The attributes of a teacher logit store (no timestamps or host names). A forward under
    autocast is recorded as the teacher's `forward_autocast` (absent for float32); `topk`: K of a
    top-k store (attributes `layout: topk`, `topk: K`), None for a dense one (no `layout`)."""
    layout = {} if topk is None else {"layout": "topk", "topk": topk}
    attrs: dict[str, Any] = {
        **layout,
        "split": split,
        "dataset": manifest["dataset"],
        "dataset_fingerprint": manifest["splits"][split]["fingerprint"],
        "num_classes": manifest["num_classes"],
        "num_views": 1 if views is None else views.num_views,
        "view_spec": VIEW_SPEC if views is None else views.spec(),
        "logits_dtype": dtype,
        "teacher": {
            "name": teacher,
            "arch": checkpoint_meta["arch"],
            "checkpoint_sha256": checkpoint_sha256,
            "pixel_mean": manifest["pixel_mean"],
            "pixel_std": manifest["pixel_std"],
            "image_shape": manifest["image_shape"],
        },
        "versions": library_versions(),
    }
    if autocast != "none":
        attrs["teacher"]["forward_autocast"] = autocast
    return attrs


def dump_split(
    model: torch.nn.Module,
    *,
    beton: Path,
    out: Path,
    num_samples: int,
    attrs: dict[str, Any],
    config: TeacherDumpConfig,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    views: StoredViews | None = None,
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """Forward every pending chunk of one split and write it; returns this rank's timing figures.

    Under torchrun (`ranks`, DESIGN §6), rank 0 locks the store, creates or resumes `.partial`
    and lists the pending chunks; rank r of K forwards and writes pending[r], pending[r + K], …
    with their completion marks; after a barrier rank 0 publishes. A chunk's bytes depend only
    on its rows, so the store is the same whatever K, and a dump killed under K ranks resumes
    under any other K.

    The model is switched to channels-last memory format (in place) and fed channels-last batches:
    oneDNN's convolutions are up to 2.6x faster on them for this project's nets, never slower
    (bench/README.md), and cuDNN's tensor-core kernels want them. The forward runs under
    `torch.inference_mode` and, with `teacher_dump.autocast`, under bfloat16 or float16 autocast
    (the float16 store's range check still applies to what comes out: a float16 overflow is inf,
    refused with one line). On CUDA the loader's batches go through pinned memory.
    """
    ranks = ranks or Ranks()
    num_classes = attrs["num_classes"]
    views = views or StoredViews("none", training_augmentation(attrs["teacher"]["image_shape"], False))
    num_views, num_params = views.num_views, len(views.augmentation.param_names)
    topk = attrs.get("topk") if attrs.get("layout") == "topk" else None
    if topk is None:
        rows_arrays = {
            "logits": ArraySpec((num_views, num_samples, num_classes), config.dtype, sample_axis=1)
        }
    else:  # DESIGN §9: the K largest logits, their class ids and the full row's log-sum-exp
        index_dtype = str(topk_index_dtype(num_classes)).removeprefix("torch.")
        rows_arrays = {
            "topk_values": ArraySpec((num_views, num_samples, topk), config.dtype, sample_axis=1),
            "topk_indices": ArraySpec((num_views, num_samples, topk), index_dtype, sample_axis=1),
            "lse": ArraySpec((num_views, num_samples), "float32", sample_axis=1),
        }
    arrays = {
        **rows_arrays,
        "labels": ArraySpec((num_samples,), "int64"),
        "sample_index": ArraySpec((num_samples,), "int64"),
        "view_params": ArraySpec((num_views, num_samples, num_params), "int16", sample_axis=1),
    }
    timing = {"load_s": 0.0, "forward_s": 0.0, "write_s": 0.0, "rows": 0, "views": 0}
    chunk_rows = dump_chunk_rows(config, num_views, num_classes)

    def writer(role: Literal["sole", "main", "follower"]) -> StoreWriter:
        return StoreWriter(out, kind="logits", arrays=arrays, attrs=attrs, chunk_rows=chunk_rows, role=role)

    with contextlib.ExitStack() as stack:
        opened: list[StoreWriter] = []

        def prepare() -> list[int]:  # rank 0: lock, then create or resume `.partial`
            opened.append(stack.enter_context(writer("main" if ranks.distributed else "sole")))
            return opened[0].pending_chunks()

        # One list, made before any rank writes: every rank takes its share of the same chunks.
        pending = from_main(ranks, prepare)
        if not ranks.main:
            opened.append(stack.enter_context(writer("follower")))
        mine = pending[ranks.rank :: ranks.world_size]
        if mine:
            _forward_chunks(
                model,
                opened[0],
                mine,
                beton=beton,
                config=config,
                mean=mean,
                std=std,
                device=device,
                views=views,
                timing=timing,
                threads=ranks.threads(),
                show=ranks.main,
            )
        barrier()  # every rank's chunks are written and marked
        if ranks.main:
            opened[0].finalize()
    return timing


def _forward_chunks(
    model: torch.nn.Module,
    writer: StoreWriter,
    chunks: list[int],
    *,
    beton: Path,
    config: TeacherDumpConfig,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    views: StoredViews,
    timing: dict[str, float],
    threads: int,
    show: bool,
) -> None:
    """Forward `chunks` (ascending) batch by batch from each chunk's first row and write each one."""
    num_views = views.num_views
    num_classes = int(writer.attrs["num_classes"])
    topk = writer.attrs.get("topk") if writer.attrs.get("layout") == "topk" else None
    model.to(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    autocast = (
        torch.autocast(device.type, dtype=getattr(torch, config.autocast))
        if config.autocast != "none"
        else contextlib.nullcontext()
    )
    indices = np.concatenate([np.arange(writer.rows(c).start, writer.rows(c).stop) for c in chunks])
    loader = make_loader(
        beton, batch_size=config.batch_size, shuffle=False, indices=indices, torch_threads=threads
    )
    out = writer.out
    batches = iter(
        progress(
            loader,
            desc=f"dump {out.parent.name}/{out.name}",
            total=len(loader),
            unit="view",
            unit_scale=config.batch_size * num_views,
            log=logger if show else logging.getLogger(f"{__name__}.rank"),
        )
    )
    for chunk in chunks:
        rows = writer.rows(chunk)
        sample_index_rows = np.arange(rows.start, rows.stop, dtype=np.int64)
        view_params = views.view_params(sample_index_rows)  # (V, rows, P)
        logits = np.empty((num_views, rows.stop - rows.start, num_classes), dtype=np.float32)
        labels = np.empty(rows.stop - rows.start, dtype=np.int64)
        filled = 0
        while filled < logits.shape[1]:
            tick = time.perf_counter()
            images, batch_labels, sample_index = next(batches)
            got = sample_index.numpy() - rows.start
            if not np.array_equal(got, np.arange(filled, filled + got.shape[0])):
                raise RuntimeError(f"{beton}: loader returned rows out of order")
            tock = time.perf_counter()
            images = images.pin_memory().to(device, non_blocking=True) if cuda else images.to(device)
            batch = slice(filled, filled + got.shape[0])
            for view in range(num_views):
                with torch.no_grad():  # not inference_mode: inference tensors would break ffcv buffers
                    inputs = normalize(views.augmentation.apply(images, view_params[view, batch]), mean, std)
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), autocast:
                    logits[view, batch] = model(inputs).float().cpu().numpy()
            timing["forward_s"] += time.perf_counter() - tock
            timing["load_s"] += tock - tick
            labels[batch] = batch_labels.numpy()
            filled += got.shape[0]
        tick = time.perf_counter()
        writer.write_chunk(
            chunk,
            {
                **_packed_rows(logits, config.dtype, topk, where=f"{out}: logits"),
                "labels": labels,
                "sample_index": sample_index_rows,
                "view_params": view_params,
            },
        )
        timing["write_s"] += time.perf_counter() - tick
        timing["rows"] += logits.shape[1]
        timing["views"] += logits.shape[0] * logits.shape[1]


def _packed_rows(logits: np.ndarray, dtype: str, topk: int | None, *, where: str) -> dict[str, np.ndarray]:
    """A chunk's (V, rows, C) float32 logits as the store holds them: `logits` (dense), or the
    top-k arrays of the logits rounded to the store dtype (so the kept values are bit for bit a
    dense store's top-k, and the lse that of the rows a dense store would hold).

    Raises:
        StoreError: NaN/inf, or a value beyond float16 range for a float16 store.
    """
    if topk is None:
        return {"logits": logits}
    check_values(logits, dtype, where=where)  # float16 overflow named before rounding to inf
    rounded = torch.from_numpy(logits.astype(dtype).astype(np.float32))  # (V, rows, C)
    values, indices, lse = topk_compress(rounded, topk)
    return {
        "topk_values": values.numpy().astype(dtype),
        "topk_indices": indices.numpy(),
        "lse": lse.numpy(),
    }


def run(
    config: TeacherDumpConfig,
    *,
    teacher: str,
    data_dir: str | Path,
    checkpoint: str | Path,
    train_out: str | Path,
    test_out: str | Path,
    device: torch.device,
) -> dict[str, Any]:
    """Dump the logits of teacher `teacher` over both splits.

    Run as one process, or as every rank of a torchrun job (`teacher_dump.nproc`, DESIGN §6):
    each rank forwards its share of the chunks on its own device, and rank 0 publishes.

    Args:
        config: TeacherDumpConfig. checkpoint: the teacher checkpoint (from teacher_train).
        train_out / test_out: the two store paths. device: the resolved device (a CUDA job puts
            rank r on `cuda:<local rank>`).
    Returns:
        {"train": timing, "test": timing, "images_per_s": float}, the timings summed over ranks.
    Raises:
        ManifestError, CheckpointError, StoreError (NaN/inf or float16 overflow), OutputError,
        RankError (rank 0 refused the output, e.g. another job holds its lock).
    """
    with process_group(device) as ranks:
        return _run(
            config,
            teacher=teacher,
            data_dir=data_dir,
            checkpoint=checkpoint,
            train_out=train_out,
            test_out=test_out,
            device=ranks.device(device),
            ranks=ranks,
        )


def _run(
    config: TeacherDumpConfig,
    *,
    teacher: str,
    data_dir: str | Path,
    checkpoint: str | Path,
    train_out: str | Path,
    test_out: str | Path,
    device: torch.device,
    ranks: Ranks,
) -> dict[str, Any]:
    data_dir = Path(data_dir)
    manifest = read_prepared(data_dir)
    views = stored_views(config, manifest["image_shape"])  # a bad view setting: refused before any work
    if config.layout == "topk" and config.topk is not None and config.topk >= manifest["num_classes"]:
        raise SettingsError(
            f"teacher_dump.topk: K = {config.topk} but {data_dir} has C = {manifest['num_classes']} "
            "classes; a top-k store keeps K < C of them: lower topk, or use layout: dense"
        )
    for out in (train_out, test_out):  # both, before the train split is dumped and published
        check_folder_output(out, "zarr.json", "a zarr store")
    model, meta = load_checkpoint(checkpoint, manifest=manifest)
    if meta.get("dataset_fingerprint") not in (None, manifest["splits"]["train"]["fingerprint"]):
        logger.warning(
            "teacher %s was trained on another train split than %s (fingerprints differ)", teacher, data_dir
        )
    model.to(device).eval()
    sha256 = file_sha256(checkpoint)
    mean, std = channel_stats(manifest, device)
    report: dict[str, Any] = {}
    started = time.perf_counter()
    for split, out in (("train", train_out), ("test", test_out)):
        split_views = views if split == "train" else None
        attrs = store_attrs(
            manifest=manifest,
            split=split,
            teacher=teacher,
            checkpoint_meta=meta,
            checkpoint_sha256=sha256,
            dtype=config.dtype,
            views=split_views,
            autocast=config.autocast,
            # The test split stays dense: it is small (V = 1) and serves agreement metrics.
            topk=config.topk if split == "train" and config.layout == "topk" else None,
        )
        report[split] = dump_split(
            model,
            beton=data_dir / f"{split}.beton",
            out=Path(out),
            num_samples=manifest["splits"][split]["num_samples"],
            attrs=attrs,
            config=config,
            mean=mean,
            std=std,
            device=device,
            views=split_views,
            ranks=ranks,
        )
        report[split] = {key: sum(t[key] for t in gather(ranks, report[split])) for key in report[split]}
    elapsed = time.perf_counter() - started
    rows = report["train"]["views"] + report["test"]["views"]
    report["images_per_s"] = rows / max(elapsed, 1e-9)
    logger.info(
        "teacher %s: dumped %d views (%s) in %.1f s (%.0f img/s)",
        teacher,
        rows,
        views.mode,
        elapsed,
        report["images_per_s"],
    )
    return report

"""Top-k stores (DESIGN §9): bytes per view and the KL error against the dense target.

For each C and K, the rows are packed by the dump's own path (`stages.teacher_dump._packed_rows`:
float16 values, int16 ids, float32 lse) and written with `StoreWriter` as the dump writes them;
the dense float16 store of the same rows is written beside it. Bytes per view are the chunk
files of the row arrays on disk (Blosc zstd 3 + byte shuffle + crc32c), and the raw bytes
(2·K + 2·K + 4 for top-k, 2·C dense).

KL error, per view, mean over views, nats:
  kl_tau1, kl_tau4   KL(q_dense^τ ‖ q̂^τ): q̂ the teacher distribution the top-k row implies
                     (`stages.topk.topk_to_dense`: exact kept logits, the rest spread evenly); at
                     τ = 1 this is the loss of putting the exact tail mass on a uniform tail.
  kd_rel_error_tau4  |L_topk − L_dense| / L_dense of the KD term τ²·KL at τ = 4 for a student
                     whose logits are the teacher's plus N(0, 1) noise (`topk_kd_loss` vs
                     `kd_loss`, α = 1): how far the rest-bucket loss is from the dense one.
  tail_mass          the τ = 1 teacher mass outside the top K (what the rest bucket carries).

Generated logits ("trained-teacher-like"): per view a Gaussian bulk N(0, 1) over all C
classes, the predicted class +U(6, 11), and 5 "confusable" classes +U(2, 6) (a trained
ImageNet-size teacher's rows have such a bulk and a few semantically close classes well
above it; the mean max probability printed beside each row says where the spectrum sits). A
real case: a `cnn_small` trained briefly on CIFAR-10 (C = 10, K = 2 and 5, the real
`teacher_dump.run` with `layout: topk`); there is no CIFAR-100 data on this machine, so no real
C = 100 teacher.

    python -m bench.topk [--quick] [--out FILE]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

NAME = "topk"
KS = (5, 10, 20)
TARGET_BYTES = 50.0  # per view at C = 1000, K = 10 (Apple's dataset reinforcement: about 65)


def generated_logits(num_views: int, num_classes: int, seed: int = 0) -> Any:
    """(num_views, C) float32 rows shaped like a trained teacher's (module doc)."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed, num_classes]))
    logits = rng.normal(0.0, 1.0, (num_views, num_classes))
    rows = np.arange(num_views)[:, None]
    boosted = np.argsort(rng.random((num_views, num_classes)), axis=1)[:, :6]  # 6 distinct classes
    logits[rows, boosted[:, :1]] += rng.uniform(6.0, 11.0, (num_views, 1))
    logits[rows, boosted[:, 1:]] += rng.uniform(2.0, 6.0, (num_views, 5))
    return logits.astype(np.float32)


def _chunk_bytes(store: Path, names: tuple[str, ...]) -> int:
    return sum(
        p.stat().st_size
        for name in names
        for p in (store / name).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )


def write_rows(out: Path, logits: Any, topk: int | None) -> int:
    """Write (N, C) logits as a V = 1 float16 store (dense, or top-k); the row arrays' bytes."""
    import numpy as np

    from stages.teacher_dump import _packed_rows
    from storage import ArraySpec, StoreWriter

    num_samples = logits.shape[0]
    packed = _packed_rows(logits[None], "float16", topk, where=str(out))
    arrays = {name: ArraySpec(value.shape, str(value.dtype), sample_axis=1) for name, value in packed.items()}
    arrays["labels"] = ArraySpec((num_samples,), "int64")
    labels = np.zeros(num_samples, dtype=np.int64)
    with StoreWriter(out, kind="logits", arrays=arrays, attrs={}, chunk_rows=num_samples) as writer:
        writer.write_chunk(0, {**packed, "labels": labels})
        writer.finalize()
    return _chunk_bytes(out, tuple(packed))


def kl_errors(logits: Any, topk: int) -> dict[str, float]:
    """The KL errors of the module doc for (N, C) float32 logits, float64 math."""
    import torch

    from stages.functional import kd_loss
    from stages.topk import topk_compress, topk_kd_loss, topk_target_log_probs, topk_to_dense

    teacher = torch.from_numpy(logits).half().double()  # what a float16 store holds
    num_samples, num_classes = teacher.shape
    values, indices, lse = topk_compress(teacher, topk)
    approx = topk_to_dense(values, indices, lse, num_classes)
    result: dict[str, float] = {}
    for tau in (1.0, 4.0):
        log_q = torch.log_softmax(teacher / tau, dim=1)
        log_hat = torch.log_softmax(approx / tau, dim=1)
        result[f"kl_tau{tau:g}"] = float((log_q.exp() * (log_q - log_hat)).sum(1).mean())
    student = teacher + torch.randn(
        teacher.shape, generator=torch.Generator().manual_seed(1), dtype=teacher.dtype
    )
    labels = torch.zeros(num_samples, dtype=torch.long)
    fixed = torch.zeros(num_samples, dtype=torch.bool)
    dense = float(kd_loss(student, teacher, labels, alpha=1.0, temperature=4.0, fixed_target=fixed))
    packed = float(topk_kd_loss(student, values, indices, lse, labels, alpha=1.0, temperature=4.0))
    result["kd_rel_error_tau4"] = abs(packed - dense) / dense
    result["tail_mass"] = float(topk_target_log_probs(values, indices, lse, num_classes)[:, -1].exp().mean())
    result["mean_max_prob"] = float(torch.softmax(teacher, dim=1).amax(1).mean())
    return result


def generated(work: Path, quick: bool) -> list[dict[str, Any]]:
    num_views = 1024 if quick else 20000
    rows = []
    for num_classes in (100, 1000):
        logits = generated_logits(num_views, num_classes)
        dense = write_rows(work / f"dense-{num_classes}.zarr", logits, None)
        for topk in KS:
            stored = write_rows(work / f"topk-{num_classes}-{topk}.zarr", logits, topk)
            rows.append(
                {
                    "source": "generated",
                    "num_classes": num_classes,
                    "topk": topk,
                    "num_views": num_views,
                    "bytes_per_view": stored / num_views,
                    "raw_bytes_per_view": 4 * topk + 4,
                    "dense_bytes_per_view": dense / num_views,
                    "dense_raw_bytes_per_view": 2 * num_classes,
                    **kl_errors(logits, topk),
                }
            )
    return rows


def real(work: Path, quick: bool) -> list[dict[str, Any]]:
    """A cnn_small trained briefly on CIFAR-10, dumped dense and top-k by `teacher_dump.run`."""
    import torch

    from pipeline.config import TeacherConfig, TeacherDumpConfig
    from stages import teacher_dump, teacher_train
    from storage import open_store

    data_dir = work / "cifar10"
    common.prepare(common.cifar10(512 if quick else 5000, 256), data_dir)
    common.ready_torch()
    device = torch.device("cpu")
    checkpoint = work / "cnn_small.pt"
    metrics = teacher_train.run(
        TeacherConfig(arch="cnn_small", epochs=1 if quick else 3),
        name="cnn_small",
        data_dir=data_dir,
        checkpoint_out=checkpoint,
        metrics_out=work / "teacher.json",
        curve_out=work / "curve.json",
        device=device,
    )
    stores = {}
    for topk in (None, 2, 5):
        out = work / f"real-{topk or 'dense'}.zarr"
        layout = {} if topk is None else {"layout": "topk", "topk": topk}
        teacher_dump.run(
            TeacherDumpConfig(**layout),  # type: ignore[arg-type]
            teacher="cnn_small",
            data_dir=data_dir,
            checkpoint=checkpoint,
            train_out=out,
            test_out=work / f"real-{topk or 'dense'}-test.zarr",
            device=device,
        )
        stores[topk] = out
    dense_store = open_store(stores[None])
    logits = dense_store.read("logits")[0].astype("float32")  # (N, C)
    num_views, num_classes = logits.shape
    dense = _chunk_bytes(stores[None], ("logits",))
    rows = []
    for topk in (2, 5):
        stored = _chunk_bytes(stores[topk], ("topk_values", "topk_indices", "lse"))
        rows.append(
            {
                "source": f"real cnn_small on CIFAR-10 (train top-1 {metrics['train_top1']:.3f})",
                "num_classes": num_classes,
                "topk": topk,
                "num_views": num_views,
                "bytes_per_view": stored / num_views,
                "raw_bytes_per_view": 4 * topk + 4,
                "dense_bytes_per_view": dense / num_views,
                "dense_raw_bytes_per_view": 2 * num_classes,
                **kl_errors(logits, topk),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    started = time.perf_counter()
    with common.tempdir(NAME) as tmp:
        rows = generated(Path(tmp), args.quick) + real(Path(tmp), args.quick)
    for row in rows:
        print(
            f"{row['source'][:9]:9s} C={row['num_classes']:4d} K={row['topk']:2d}: "
            f"{row['bytes_per_view']:.1f} B/view (raw {row['raw_bytes_per_view']}; dense "
            f"{row['dense_bytes_per_view']:.0f}), KL τ=1 {row['kl_tau1']:.2e} τ=4 {row['kl_tau4']:.2e}, "
            f"KD rel. error τ=4 {row['kd_rel_error_tau4']:.2e}, tail mass {row['tail_mass']:.3f}"
        )
    target = next(
        r for r in rows if r["source"] == "generated" and r["num_classes"] == 1000 and r["topk"] == 10
    )
    result = {
        "quick": args.quick,
        "codec": "blosc zstd clevel 3, byte shuffle, crc32c",
        "rows": rows,
        "target": {
            "bytes_per_view_c1000_k10": target["bytes_per_view"],
            "limit": TARGET_BYTES,
            "verdict": "pass" if target["bytes_per_view"] <= TARGET_BYTES else "miss",
        },
    }
    common.write_result(NAME, result, args.out, started)
    return result


if __name__ == "__main__":
    common.main_guard(main)

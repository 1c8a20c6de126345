"""Zarr v3 soft-label stores: complete-or-absent, self-describing, checked on every open.

Schema (DESIGN.md §3). Every store is one zarr group whose arrays all share the sample axis N
and are chunked along N only, with the same chunk rows, so one writer owns whole chunks:

    logits.zarr      logits (V, N, C) float16|float32, labels (N,) int64, sample_index (N,) int64,
                     view_params (V, N, P) int16; or, with attrs `layout: topk`, `topk: K`
                     (DESIGN §9), topk_values (V, N, K) float16|float32, topk_indices (V, N, K)
                     int16 (int32 if C > 32767) and lse (V, N) float32 in place of logits
    adjusted-M.zarr  target_logits (V, N, C), fixed_target (V, N) bool, rewritten (V, N) bool,
                     sample_index (N,) int64
    dtd.zarr         teacher_* statistics, omega_teacher, static_temperature (V, N) float32,
                     sample_index (N,) int64

Every finished store records `content_digest` (sha256 of its arrays' files); a derived store
(adjusted, dtd) records its source's digest under `source` and copies its `sample_index`, and
consumers check both (`SoftLabelStore.expect_source`), DESIGN §8.

Every chunk is Blosc-zstd compressed (byte shuffle) and ends with a crc32c checksum that zarr
verifies on each read, so a chunk damaged on disk is a StoreError, never different logits.
Attributes never hold timestamps or host names (DVC hashes must be stable). A writer builds
`<out>.partial/`, marks each finished chunk under `<out>.partial/.lessons/done/`, and renames
the folder into place only when every chunk is marked; a rerun with the same plan resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
import zarr.codecs

from storage.atomic import (
    WORK_MARKER,
    OutputError,
    atomic_write_bytes,
    atomic_write_json,
    create_work_dir,
    describe_os_error,
    exclusive_lock,
    owns_work_dir,
    partial_path,
    refuse_foreign_output,
    replace_dir,
)
from storage.errors import LessonsError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_MARKS = WORK_MARKER  # resume marks live inside the ownership marker folder


class StoreError(LessonsError, ValueError):
    """A store is missing, unfinished, of another schema, or does not match what it is used with."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store: its full shape, dtype and which axis is the sample axis N."""

    shape: tuple[int, ...]
    dtype: str
    sample_axis: int = 0

    def chunks(self, chunk_rows: int) -> tuple[int, ...]:
        return tuple(
            min(chunk_rows, n) if axis == self.sample_axis else max(n, 1) for axis, n in enumerate(self.shape)
        )

    def fill_value(self) -> Any:
        kind = np.dtype(self.dtype).kind
        return {"f": float("nan"), "i": -1, "u": 0, "b": False}[kind]


def _compressors(dtype: str) -> tuple[Any, ...]:
    # Byte shuffle groups the exponent bytes of floats together: ~1.3-2x smaller logits. The
    # crc32c codec appends a checksum to every compressed chunk and zarr verifies it on each
    # read, so a chunk damaged on disk is an error, never silently different logits.
    itemsize = np.dtype(dtype).itemsize
    return (
        zarr.codecs.BloscCodec(
            cname="zstd", clevel=3, shuffle="shuffle" if itemsize > 1 else "noshuffle", typesize=itemsize
        ),
        zarr.codecs.Crc32cCodec(),
    )


@contextlib.contextmanager
def checked_reads(path: str | Path) -> Iterator[None]:
    """Turn zarr's checksum mismatch on a chunk of the store at `path` into a one-line StoreError.

    Raises:
        StoreError: a chunk read inside the block fails its crc32c check (damaged on disk).
    """
    try:
        yield
    except ValueError as exc:
        if isinstance(exc, StoreError) or "checksum" not in str(exc).lower():
            raise
        raise StoreError(
            f"{path}: a chunk fails its crc32c checksum (the file was damaged on disk); "
            "rebuild the store (dvc repro --force the stage that writes it)"
        ) from exc


def _jsonable(obj: Any) -> Any:
    """Attributes as plain JSON (tuples to lists, numpy scalars to Python)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def check_values(value: np.ndarray, dtype: str, *, where: str) -> None:
    """Refuse values that a store of `dtype` cannot hold faithfully.

    Args:
        value: the array to be stored. dtype: the store array's dtype. where: message prefix.
    Raises:
        StoreError: non-numeric data for a float array, NaN/inf, a value beyond float16 range
            for a float16 array, or non-integer data for an integer array.
    """
    check_blocks([value], dtype, where=where)


def check_blocks(blocks: Iterable[np.ndarray], dtype: str, *, where: str) -> None:
    """`check_values` over an array given block by block (e.g. rows read from a file), with
    counts and the peak over all blocks; only one block is held at a time.

    Raises:
        StoreError: as `check_values`, the NaN/inf count and the peak being the whole array's.
    """
    target = np.dtype(dtype)
    non_finite, peak = 0, 0.0
    for value in blocks:
        if target.kind == "f":
            if value.dtype.kind not in "fiu":
                raise StoreError(f"{where} must be numeric, got {value.dtype}")
            finite = np.isfinite(value)
            non_finite += int(finite.size - np.count_nonzero(finite))
            if target == np.float16 and value.size and not non_finite:  # NaN/inf outrank a peak
                peak = max(peak, float(np.abs(value).max()))
        elif target.kind in "iu" and value.dtype.kind not in "iub":
            raise StoreError(f"{where} must be integer, got {value.dtype}")
    if non_finite:
        raise StoreError(
            f"{where} has {non_finite} NaN/inf values; fix the producer (a diverged teacher?) before caching"
        )
    if peak > FLOAT16_MAX:
        raise StoreError(
            f"{where} has |value| {peak:.4g} beyond the float16 "
            f"range ({FLOAT16_MAX:g}); set teacher_dump.dtype: float32"
        )


def content_digest(path: str | Path) -> str:
    """sha256 over every file of every array of the store folder `path` (chunk bytes, each
    array's metadata), in sorted order: two stores have the same digest exactly when their
    arrays hold the same bytes. The group's attributes are not part of it.

    Raises:
        OSError: a file cannot be read.
    """
    path = Path(path)
    digest = hashlib.sha256()
    for array_dir in sorted(p for p in path.iterdir() if p.is_dir() and (p / "zarr.json").is_file()):
        for file in sorted(f for f in array_dir.rglob("*") if f.is_file()):
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


class StoreWriter:
    """Writes one store chunk by chunk into `<out>.partial/`, resumably; `finalize` publishes it.

    Use as a context manager: it holds an exclusive lock on `out` for its lifetime.

    Args:
        out: final path of the store (a folder, e.g. `stores/cnn/logits.zarr`).
        kind: `logits`, `adjusted` or `dtd` (checked by readers).
        arrays: name -> ArraySpec; all must share the same N.
        attrs: store attributes (JSON-able, no timestamps).
        chunk_rows: rows of N per chunk (the unit of writing and of resume).
        role: `sole` (one writer), or for the ranks of a torchrun job (DESIGN §6) `main` (rank 0:
            holds the lock, creates `.partial`, publishes; never deletes `.partial` on failure,
            as other ranks write into it) and `follower` (other ranks: no lock; open the
            `.partial` rank 0 made, write chunks, never publish).
    Raises:
        OutputError: `out` is being written by another process, or is not writable.
        StoreError: inconsistent array specs.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        kind: str,
        arrays: Mapping[str, ArraySpec],
        attrs: Mapping[str, Any],
        chunk_rows: int,
        role: Literal["sole", "main", "follower"] = "sole",
    ) -> None:
        self.out = Path(out)
        self.role = role
        refuse_foreign_output(self.out, "zarr.json", "a zarr store")
        if self.out.is_dir():
            try:
                old_kind = json.loads((self.out / "zarr.json").read_text()).get("attributes", {}).get("kind")
            except (OSError, ValueError):
                old_kind = None
            if old_kind != kind:
                raise OutputError(
                    errno.EEXIST,
                    f"{self.out}: holds a store of kind {old_kind!r}, and this "
                    f"writes kind {kind!r}; choose another output path or move it away",
                )
        self.partial = partial_path(self.out)
        sizes = {spec.shape[spec.sample_axis] for spec in arrays.values()}
        if len(sizes) != 1:
            raise StoreError(f"{out}: arrays disagree on the number of samples: {sorted(sizes)}")
        self.num_samples = sizes.pop()
        if self.num_samples < 1:
            raise StoreError(f"{out}: refusing to write an empty store (N = 0)")
        if chunk_rows < 1:
            raise StoreError(f"{out}: chunk_rows must be positive, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows)
        self.arrays = dict(arrays)
        self.attrs = _jsonable(
            {
                **attrs,
                "kind": kind,
                "schema_version": SCHEMA_VERSION,
                "num_samples": self.num_samples,
                "chunk_rows": self.chunk_rows,
            }
        )
        self.num_chunks = -(-self.num_samples // self.chunk_rows)
        self._lock = contextlib.nullcontext() if role == "follower" else exclusive_lock(self.out)
        self._group: zarr.Group | None = None
        self._written: set[str] = set()

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        self._lock.__enter__()
        try:
            self._open()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if (
                self.role == "sole"
                and exc_info[0] is not None
                and self.partial.exists()
                and not self.completed_chunks()
            ):
                # A failed write that finished no chunk holds nothing worth resuming: leave no
                # partial output behind (bad input, a full disk), only the work of marked chunks.
                shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            self._lock.__exit__(*exc_info)

    def _plan(self) -> dict[str, Any]:
        return {
            "attrs": self.attrs,
            "arrays": {k: dataclasses.asdict(v) for k, v in sorted(self.arrays.items())},
        }

    def _open(self) -> None:
        plan = self._plan()
        plan_file = self.partial / _MARKS / "plan.json"
        created = False
        if self.role == "follower":
            try:
                same = owns_work_dir(self.partial) and json.loads(plan_file.read_text()) == _jsonable(plan)
            except (OSError, ValueError):
                same = False
            if not same:
                raise StoreError(
                    f"{self.partial}: rank 0 has not prepared this store for these settings; "
                    "start every rank with the same command and params"
                )
            self._group = zarr.open_group(self.partial, mode="r+")
            return
        try:
            if owns_work_dir(self.partial):
                try:
                    same = json.loads(plan_file.read_text()) == _jsonable(plan)
                except (OSError, ValueError):
                    same = False
                if same:
                    done = len(self.completed_chunks())
                    logger.info(
                        "%s: resuming, %d of %d chunks already written", self.out, done, self.num_chunks
                    )
                    self._group = zarr.open_group(self.partial, mode="r+")
                    return
                logger.warning("%s: discarding an unfinished write made with other settings", self.out)
            create_work_dir(self.partial)  # refuses a folder at that name that lessons did not make
            created = True
            group = zarr.open_group(self.partial, mode="a", zarr_format=3)
            for name, spec in self.arrays.items():
                group.create_array(
                    name,
                    shape=spec.shape,
                    dtype=spec.dtype,
                    chunks=spec.chunks(self.chunk_rows),
                    fill_value=spec.fill_value(),
                    compressors=_compressors(spec.dtype),
                )
            (self.partial / _MARKS / "done").mkdir()
            atomic_write_json(plan_file, plan)
            self._group = group
        except OSError as exc:
            if created:  # e.g. the disk filled up while creating the arrays: leave nothing behind
                shutil.rmtree(self.partial, ignore_errors=True)
            if isinstance(exc, OutputError):
                raise
            raise OutputError(exc.errno, describe_os_error(exc, self.partial)) from exc

    # -- chunks ---------------------------------------------------------------------------
    def rows(self, chunk: int) -> slice:
        """The N-rows of chunk `chunk`."""
        return slice(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.num_samples))

    def completed_chunks(self) -> set[int]:
        marks = self.partial / _MARKS / "done"
        # Only whole marks count: a process killed inside atomic_write_bytes leaves its
        # `.<chunk>.<random>` temporary file here, which must neither count nor break a resume.
        return {int(p.name) for p in marks.iterdir() if p.name.isdigit()} if marks.exists() else set()

    def pending_chunks(self) -> list[int]:
        done = self.completed_chunks()
        return [c for c in range(self.num_chunks) if c not in done]

    def write_chunk(self, chunk: int, values: Mapping[str, np.ndarray]) -> None:
        """Write every array's rows of `chunk`, then mark the chunk done.

        Raises:
            StoreError: a missing or extra array, a shape or dtype that does not fit, NaN/inf in
                float data, or a value beyond float16 range for a float16 array.
            OutputError: disk full or not writable.
        """
        assert self._group is not None, "use StoreWriter as a context manager"
        if set(values) != set(self.arrays):
            raise StoreError(
                f"{self.out}: chunk {chunk} must give arrays {sorted(self.arrays)}, got {sorted(values)}"
            )
        rows = self.rows(chunk)
        try:
            for name, value in values.items():
                spec = self.arrays[name]
                value = self._checked(name, spec, np.asarray(value), rows)
                index = tuple(
                    rows if axis == spec.sample_axis else slice(None) for axis in range(len(spec.shape))
                )
                self._array(name)[index] = value
            atomic_write_bytes(self.partial / _MARKS / "done" / str(chunk), b"")
        except OSError as exc:
            raise OutputError(exc.errno, describe_os_error(exc, self.partial)) from exc

    def _checked(self, name: str, spec: ArraySpec, value: np.ndarray, rows: slice) -> np.ndarray:
        expected = list(spec.shape)
        expected[spec.sample_axis] = rows.stop - rows.start
        if list(value.shape) != expected:
            raise StoreError(
                f"{self.out}: array {name!r} chunk has shape {value.shape}, expected {tuple(expected)}"
            )
        check_values(value, spec.dtype, where=f"{self.out}: array {name!r}")
        return value.astype(np.dtype(spec.dtype), copy=False)

    def write_dask(
        self, values: Mapping[str, Any], scheduler: Any = None, reductions: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Store dask arrays (one per array name, or a subset) into the store, then mark chunks.

        Every dask chunk must coincide with a zarr chunk (misaligned parallel writes to zarr lose
        rows silently), which is asserted before anything is written. All chunks are marked done
        only when every array of the store has been written by this or earlier calls.

        Args:
            values: name -> dask.array.Array of the array's full shape.
            scheduler: passed to dask (None = the default threaded scheduler, or the active
                `dask.distributed.Client`).
            reductions: name -> dask object computed in the same pass (e.g. a count over an
                input that the stored arrays are computed from, so the input is read once).
        Returns:
            the computed reductions.
        Raises:
            StoreError: an unknown name, a shape or chunking that does not fit.
        """
        import dask.array as da

        assert self._group is not None, "use StoreWriter as a context manager"
        sources: list[da.Array] = []
        targets: list[
            Any
        ] = []  # zarr arrays: dask types `targets` as numpy-like, zarr is written by __setitem__
        for name, value in values.items():
            if name not in self.arrays:
                raise StoreError(f"{self.out}: no array {name!r} in this store")
            spec = self.arrays[name]
            if tuple(value.shape) != spec.shape:
                raise StoreError(f"{self.out}: array {name!r} has shape {value.shape}, expected {spec.shape}")
            zarr_chunks = spec.chunks(self.chunk_rows)
            expected = tuple(
                tuple(min(c, n - start) for start in range(0, n, c)) if n else (0,)
                for c, n in zip(zarr_chunks, spec.shape, strict=True)
            )
            if tuple(value.chunks) != expected:
                raise StoreError(
                    f"{self.out}: array {name!r} dask chunks {value.chunks} do not "
                    f"coincide with the zarr chunks {zarr_chunks}"
                )
            sources.append(value.astype(spec.dtype))
            targets.append(self._array(name))
        import dask
        import dask.system

        reductions = reductions or {}
        names = list(reductions)
        # On the local threaded scheduler, a private pool: when one task fails, dask raises at
        # once while other tasks may still be writing chunks; shutting the pool down waits for
        # them, so a failed write's cleanup never races a writer (which left `.partial` behind).
        pool = ThreadPoolExecutor(dask.system.CPU_COUNT) if scheduler in (None, "threads") else None
        options = {"scheduler": "threads", "pool": pool} if pool is not None else {"scheduler": scheduler}
        try:
            stored = da.store(sources, targets, lock=False, compute=False)
            results = dask.compute(stored, *[reductions[n] for n in names], **options)[1:]
        except OSError as exc:
            raise OutputError(exc.errno, describe_os_error(exc, self.partial)) from exc
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._written.update(values)
        if self._written >= set(self.arrays):
            self._mark_all_done()
        return dict(zip(names, results, strict=True))

    def _mark_all_done(self) -> None:
        """Mark every chunk done at once. A mark is an empty file, whose creation is atomic, so
        one fsync of the marks folder replaces a temporary file, rename and fsync per chunk."""
        marks = self.partial / _MARKS / "done"
        try:
            for chunk in range(self.num_chunks):
                (marks / str(chunk)).touch()
            folder = os.open(marks, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError as exc:
            raise OutputError(exc.errno, describe_os_error(exc, self.partial)) from exc

    def _drop_torn_chunk_writes(self) -> None:
        """Delete the temporary files of chunk writes that a killed writer left inside the arrays
        (zarr writes `<chunk>.<random>.partial`, then renames it): the chunk itself was written
        again, whole, on resume, and a stray file would change the content digest and the bytes
        of the published store."""
        for name in self.arrays:
            for stray in (self.partial / name).rglob("*.partial"):
                if stray.is_file():
                    stray.unlink()

    def _array(self, name: str) -> zarr.Array:
        # Every chunk is written, even one that equals the fill value (zarr skips those by
        # default), so that `open_store` can take a missing chunk file for damage.
        assert self._group is not None
        return _member_array(self._group, name).with_config({"write_empty_chunks": True})

    def partial_array(self, name: str) -> zarr.Array:
        """An array of the store being written (to read back what was stored)."""
        assert self._group is not None
        return _member_array(self._group, name)

    def finalize(self, extra_attrs: Mapping[str, Any] | None = None) -> None:
        """Publish the store: check every chunk is marked, record completeness, rename into place.

        Args:
            extra_attrs: attributes known only at the end (counts, summary statistics).
        Raises:
            StoreError: some chunks were never written.
        """
        assert self._group is not None
        if self.role == "follower":
            raise StoreError(f"{self.out}: only rank 0 publishes a store")
        pending = self.pending_chunks()
        if pending:
            raise StoreError(
                f"{self.out}: {len(pending)} chunks were never written "
                f"(first: {pending[0]}); the store is left unfinished in {self.partial}"
            )
        try:
            self._drop_torn_chunk_writes()
            self._group.attrs.update(
                {
                    **self.attrs,
                    **_jsonable(dict(extra_attrs or {})),
                    "content_digest": content_digest(self.partial),
                    "complete": True,
                }
            )
            replace_dir(self.partial, self.out, marker="zarr.json", what="a zarr store")
        except OSError as exc:
            raise OutputError(exc.errno, describe_os_error(exc, self.out)) from exc
        logger.info("%s: written (%d samples, %d chunks)", self.out, self.num_samples, self.num_chunks)


class SoftLabelStore:
    """A finished store opened read-only. Use `open_store` to get one (it validates)."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)

    @property
    def kind(self) -> str:
        return self.attrs["kind"]

    @property
    def num_samples(self) -> int:
        return int(self.attrs["num_samples"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def content_digest(self) -> str:
        """The digest of this store's arrays (`content_digest`), recorded when it was written
        (computed from the files for a store written before lessons recorded it)."""
        if "content_digest" not in self.attrs:
            self.attrs["content_digest"] = content_digest(self.path)
        return self.attrs["content_digest"]

    def as_source(self) -> dict[str, Any]:
        """What a store derived from this one records about it (DESIGN §8): the folder name and
        the content digest. The derived store also copies `sample_index`."""
        return {"store": self.path.name, "content_digest": self.content_digest}

    def expect_source(self, source: SoftLabelStore) -> None:
        """Refuse this derived store unless it was computed from `source`, exactly: the content
        digest it recorded is `source`'s and its `sample_index` equals `source`'s row for row.

        Raises:
            StoreError: naming both stores and what differs.
        """
        recorded = self.attrs.get("source")
        if not isinstance(recorded, dict) or "content_digest" not in recorded or "sample_index" not in self:
            raise StoreError(
                f"{self.path}: does not record the store it was derived from (written by an "
                "older lessons); rebuild it (dvc repro)"
            )
        if recorded["content_digest"] != source.content_digest:
            raise StoreError(
                f"{self.path}: was derived from a store of content digest "
                f"{recorded['content_digest'][:12]}... "
                f"but {source.path} has {source.content_digest[:12]}...; it belongs to another dump of the "
                "teacher: rebuild it from this one (dvc repro)"
            )
        self.expect_sample_index(source.read("sample_index"), against=str(source.path))

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def array(self, name: str) -> zarr.Array:
        node = self.group.get(name)
        if not isinstance(node, zarr.Array):
            raise StoreError(f"{self.path}: no array {name!r} in this {self.kind} store")
        return node

    def read(self, name: str) -> np.ndarray:
        """The whole array `name` in memory (every chunk's checksum verified).

        Raises:
            StoreError: no such array, or a chunk fails its checksum.
        """
        with checked_reads(self.path):
            return np.asarray(self.array(name)[...])

    def read_view(self, name: str, view: int = 0) -> np.ndarray:
        """View `view` of a (V, N, ...) array in memory, e.g. (N, C) logits (checksums verified).

        Raises:
            StoreError: no such array, or a chunk fails its checksum.
        """
        with checked_reads(self.path):
            return np.asarray(self.array(name)[view])

    def read_pairs(self, name: str, view: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """`name[view[i], sample[i]]` for each pair i of a (V, N, ...) array, reading every chunk of
        rows that holds a pair once, in row order (a store never needs random reads).

        Args:
            view, sample: (K,) int64; `sample` ascending.
        Returns:
            (K, ...) in the array's dtype.
        Raises:
            StoreError: no such array, or a chunk fails its checksum.
        """
        array, step = self.array(name), self.chunk_rows
        out = np.empty((view.shape[0], *array.shape[2:]), dtype=array.dtype)
        with checked_reads(self.path):
            for start in np.unique(sample // step) * step:
                mine = slice(*np.searchsorted(sample, [start, start + step]))
                block = np.asarray(array[:, start : start + step])  # (V, rows, ...): all views
                out[mine] = block[view[mine], sample[mine] - start]
        return out

    def expect(self, *, against: str = "what it is used with", **expected: Any) -> None:
        """Refuse the store when an attribute differs from what it is combined with.

        Keyword names are attribute names (e.g. `dataset_fingerprint`, `num_classes`); `against`
        names the other side (a manifest, another store). The error names both sides and, for a
        nested attribute such as `teacher`, the first entry that differs. Raises StoreError.
        """
        for key, want in expected.items():
            have = self.attrs.get(key)
            if have != want:
                path, have, want = _first_difference(key, have, want)
                raise StoreError(
                    f"{self.path}: {path} is {_short(have)} in the store but {_short(want)} in "
                    f"{against}; the store is stale or from another run: rebuild it (dvc repro)"
                )

    def expect_sample_index(self, sample_index: np.ndarray, *, against: str = "the dataset") -> None:
        """Refuse the store unless its `sample_index` equals `sample_index` element for element."""
        have = self.read("sample_index")
        if have.shape != sample_index.shape:
            raise StoreError(
                f"{self.path}: sample_index does not match {against} ({have.shape[0]} rows in the "
                f"store, {sample_index.shape[0]} in {against}); rebuild the store for this dataset"
            )
        if not np.array_equal(have, sample_index):
            row = int(np.flatnonzero(have != sample_index)[0])
            raise StoreError(
                f"{self.path}: sample_index does not match {against} (row {row} holds sample "
                f"{int(have[row])} in the store, {int(sample_index[row])} in {against}); the rows are "
                "in another order or subset: rebuild the store for this dataset"
            )

    def check_layout(self) -> None:
        """Refuse a store whose arrays disagree with its own attributes.

        Every array must have `num_samples` rows on its sample axis (axis 0 of a 1-D array,
        axis 1 otherwise); a logit store's `logits` must be (num_views, N, num_classes) and its
        `sample_index` the canonical 0..N-1 (consumers pair row n with sample n).

        Raises:
            StoreError: naming the array and both shapes.
        """
        n = self.num_samples
        for name in sorted(self.group.array_keys()):
            shape = _member_array(self.group, name).shape
            rows = shape[0] if len(shape) == 1 else shape[1] if len(shape) > 1 else None
            if rows != n:
                raise StoreError(
                    f"{self.path}: array {name!r} has shape {shape} but the store says "
                    f"num_samples = {n}; the store is damaged: rebuild it"
                )
        if self.kind == "logits":
            want = (self.attrs.get("num_views"), n, self.attrs.get("num_classes"))
            if not (isinstance(want[0], int) and want[0] >= 1):
                raise StoreError(
                    f"{self.path}: num_views is {want[0]!r}; a store holds at least one view of "
                    "each sample: rebuild it"
                )
            if self.attrs.get("layout", "dense") == "topk":
                k = self.attrs.get("topk")
                expected = {
                    "topk_values": (want[0], n, k),
                    "topk_indices": (want[0], n, k),
                    "lse": (want[0], n),
                }
            else:
                expected = {"logits": want}
            for name, shape_wanted in expected.items():
                shape = self.array(name).shape
                if tuple(shape) != shape_wanted:
                    raise StoreError(
                        f"{self.path}: {name} has shape {tuple(shape)} but the attributes "
                        f"say {shape_wanted} (num_views, N, ...); rebuild the store"
                    )
            self.expect_sample_index(np.arange(n, dtype=np.int64), against="the canonical order 0..N-1")


def _first_difference(key: str, have: Any, want: Any) -> tuple[str, Any, Any]:
    """The dotted path of the first entry where two (nested) attribute values differ."""
    while isinstance(have, dict) and isinstance(want, dict):
        sub = next((k for k in sorted(set(have) | set(want), key=str) if have.get(k) != want.get(k)), None)
        if sub is None:
            break
        key, have, want = f"{key}.{sub}", have.get(sub), want.get(sub)
    return key, have, want


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "...'"


def open_store(
    path: str | Path, *, kind: str | None = None, layouts: tuple[str, ...] = ("dense",)
) -> SoftLabelStore:
    """Open a finished store read-only and check its schema.

    Args:
        path: the store folder. kind: the store kind expected (None: any).
        layouts: the row layouts the caller reads (attribute `layout`, "dense" when absent):
            a consumer that needs every logit of a row keeps the default and so refuses a
            top-k store (DESIGN §9) before reading or writing anything.
    Raises:
        StoreError: the folder is missing, only a `.partial` exists, it is not a zarr group, it
            was written by another schema version, it is incomplete, it is of another kind or
            layout, a chunk file of a (non-bool) array is missing, a chunk fails its checksum,
            or its arrays no longer match the content digest recorded when it was written.
    """
    path = Path(path)
    if not path.exists():
        hint = (
            " (an unfinished write exists beside it: rerun the stage to resume)"
            if partial_path(path).exists()
            else "; run the stage that writes it first"
        )
        raise StoreError(f"{path}: no such store{hint}")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is not a group
        raise StoreError(f"{path}: not a zarr store ({type(exc).__name__}); rebuild it") from exc
    attrs = dict(group.attrs)
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema_version {version!r} but this lessons reads "
            f"{SCHEMA_VERSION}; rebuild the store with this version"
        )
    if attrs.get("complete") is not True:
        raise StoreError(f"{path}: the store is incomplete (never finalized); rebuild it")
    if kind is not None and attrs.get("kind") != kind:
        raise StoreError(f"{path}: a {attrs.get('kind')!r} store where a {kind!r} store is expected")
    layout = attrs.get("layout", "dense")
    if layout not in layouts:
        if layout == "topk":
            raise StoreError(
                f"{path}: a top-k store (layout: topk, topk: {attrs.get('topk')}) but this command "
                "needs dense logits (every class of a row); set teacher_dump.layout: dense and "
                "rerun the dump (dvc repro teacher_dump), or give it a dense store"
            )
        raise StoreError(f"{path}: a store of layout {layout!r} where {' or '.join(layouts)} is expected")
    try:  # an array's metadata that is not zarr's (edited, truncated) must not become a traceback
        _check_chunks(path, group)
    except (ValueError, TypeError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
        if isinstance(exc, StoreError):
            raise
        raise StoreError(
            f"{path}: an array's metadata cannot be read ({type(exc).__name__}); the store is "
            f"damaged: {_rebuild_hint(attrs)}"
        ) from exc
    _check_digest(path, group, attrs)
    return SoftLabelStore(path, group)


def _check_digest(path: Path, group: zarr.Group, attrs: dict[str, Any]) -> None:
    """Refuse a store whose arrays' files no longer hash to the `content_digest` recorded when it
    was written (a chunk edited in place, labels rewritten by hand): the stores derived from it
    and the students trained on it would silently disagree with it. A chunk damaged on disk
    is reported as such (its crc32c check) rather than as an edit.

    Raises:
        StoreError: naming the store and the stage that rebuilds it.
    """
    recorded = attrs.get("content_digest")
    if recorded is None or content_digest(path) == recorded:
        return
    with checked_reads(path):
        for name in sorted(group.array_keys()):
            _member_array(group, name)[...]  # a damaged chunk raises its checksum error here
    raise StoreError(
        f"{path}: its arrays changed after it was written (their files no longer match the "
        f"recorded content digest): it was edited in place; {_rebuild_hint(attrs)}"
    )


def _check_chunks(path: Path, group: zarr.Group) -> None:
    """Refuse a store with a chunk file missing: zarr would read its rows as the fill value
    (NaN for floats), which consumers would then blame on the values.

    Bool arrays are not checked: stores written before every chunk was written lack the chunks
    that are all False. One directory walk per array (stores hold tens of files).

    Raises:
        StoreError: naming the store, the missing chunk and its samples, and the stage to rerun.
    """
    for name in sorted(group.array_keys()):
        array = _member_array(group, name)
        if array.dtype == np.bool_:
            continue
        folder = path / array.path
        present = {
            Path(root, file).relative_to(folder).as_posix()
            for root, _, files in os.walk(folder)
            for file in files
        }
        axis = 0 if array.ndim == 1 else 1  # the sample axis (every store array has one)
        for coords in itertools.product(*(range(n) for n in array.cdata_shape)):
            key = array.metadata.encode_chunk_key(coords)
            if key not in present:
                first = coords[axis] * array.chunks[axis]
                last = min(first + array.chunks[axis], array.shape[axis]) - 1
                raise StoreError(
                    f"{path}: chunk {name}/{key} (samples {first}..{last}) is missing: the "
                    f"store is damaged or incomplete; {_rebuild_hint(dict(group.attrs))}"
                )


def _member_array(group: zarr.Group, name: str) -> zarr.Array:
    """`group[name]`, for a name from `group.array_keys()` or a store's own array specs."""
    node = group[name]
    assert isinstance(node, zarr.Array), f"{name} is a group, not an array"
    return node


def _rebuild_hint(attrs: dict[str, Any]) -> str:
    """How to rebuild a store: the `dvc repro --force` command of the stage that writes it."""
    teacher = attrs["teacher"] if isinstance(attrs.get("teacher"), dict) else {}
    name = teacher.get("name")
    if attrs.get("kind") == "logits" and teacher.get("arch") == "external":
        return "rebuild it: rerun lessons import-logits"
    if attrs.get("kind") == "logits" and teacher.get("arch") == "ensemble":
        return f"rebuild it: lessons ensemble --ensemble {name}"
    stage = {
        "logits": f"teacher_dump@{name}",
        "adjusted": f"adjust@{name}-{attrs.get('method')}",
        "dtd": f"temperature@{name}",
    }.get(attrs.get("kind", ""))
    return (
        f"rebuild it: dvc repro --force {stage}"
        if name and stage
        else "rebuild it: dvc repro --force the stage that writes it"
    )

"""Atomic file and directory writes, and an exclusive per-output lock.

A finished output is always complete: files are written beside their destination and renamed
into place (`os.replace`), directories are built as `<out>.partial/` and renamed when done.
A lock file `<out>.lock` (advisory `flock`, released by the kernel when the holder dies, even on
SIGKILL) makes a second writer of the same output fail at once instead of interleaving.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


class OutputError(OSError):
    """An output cannot be written (locked by another process, not writable, disk full)."""


def partial_path(out: str | Path) -> Path:
    """The work-in-progress directory of `out`: `<out>.partial`."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def describe_os_error(exc: OSError, path: str | Path) -> str:
    """One line for an OS error while writing `path`, with the fix."""
    if exc.errno == errno.ENOSPC:
        return f"{path}: no space left on the device; free some disk space and run again"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{path}: not writable (a part of the path is a file, not a folder); choose another output path"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: not writable ({exc.strerror}); choose a writable output path"
    return f"{path}: {exc.strerror or exc}"


def refuse_foreign_output(out: str | Path, marker: str, what: str) -> None:
    """Refuse to replace `out` unless it is absent or an earlier output of the same kind: a folder
    holding the file `marker` (lessons replaces only what it wrote; a user's file or folder given
    as an output path by mistake is never deleted).

    Raises:
        OutputError: `out` exists and is not a folder holding `marker`.
    """
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not (out.is_dir() and (out / marker).is_file()):
        kind = "a folder" if out.is_dir() else "a file"
        raise OutputError(errno.EEXIST, f"{out}: exists and is {kind}, not {what}; lessons only replaces "
                                        "its own outputs: choose another output path or move it away")


@contextlib.contextmanager
def exclusive_lock(out: str | Path) -> Iterator[None]:
    """Hold `<out>.lock` for the duration; raise OutputError at once if another process holds it.

    Raises:
        OutputError: another process is writing `out`, or the lock file cannot be created.
    """
    out = Path(out)
    lock_path = out.with_name(out.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(exc.errno, describe_os_error(exc, lock_path)) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OutputError(
                errno.EBUSY,
                f"{out}: another process is writing this output (lock {lock_path} is held); "
                "wait for it to finish or stop it",
            ) from exc
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays (unlinking it would race a waiter)


def ensure_parents(*paths: str | Path) -> None:
    """Create the folders of output files now, so an unwritable output fails before any work.

    Raises:
        OutputError: a folder cannot be created (e.g. a regular file is in the way) or is not
            writable.
    """
    for path in paths:
        parent = Path(path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if not os.access(parent, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as exc:
            raise OutputError(exc.errno, describe_os_error(exc, path)) from exc


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write `payload` to `path` via a temporary file in the same folder and `os.replace`.

    Raises:
        OutputError: the folder is not writable or the disk is full; `path` is left untouched.
    """
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            tmp_name = f.name
            f.write(payload)
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide outputs from other users
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except OSError as exc:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        raise OutputError(exc.errno, describe_os_error(exc, path)) from exc


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as sorted, indented JSON atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished directory `src` to `dst`, replacing an older `dst` only once `src` is in.

    The old `dst` is first renamed aside, so at every instant either the old or the new output
    exists under `dst`'s name or beside it; it is deleted only after the new one is in place.
    """
    src, dst = Path(src), Path(dst)
    aside = dst.with_name(dst.name + ".old")
    if aside.exists():
        shutil.rmtree(aside)
    had_old = dst.exists()
    if had_old:
        os.replace(dst, aside)
    try:
        os.replace(src, dst)
    except OSError:
        if had_old:
            os.replace(aside, dst)
        raise
    if had_old:
        shutil.rmtree(aside, ignore_errors=True)

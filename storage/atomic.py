"""Atomic file and directory writes, an exclusive per-output lock, and the rules that keep a
user's files safe.

A finished output is always complete: files are written to a uniquely named temporary file
beside their destination and renamed into place (`os.replace`); directories are built as
`<out>.partial/` and renamed when done. A lock file `<out>.lock` (advisory `flock`, released by
the kernel when the holder dies, even on SIGKILL) makes a second writer of the same output fail
at once instead of interleaving.

Nothing lessons did not write is ever deleted. The sibling paths a writer uses are:

- `<out>.lock`: opened (never truncated, written or deleted); a symbolic link there is refused.
- `<out>.partial/`: a work folder lessons creates with a `.lessons/` marker folder inside; it
  is deleted or resumed only when it carries that marker and is not a symbolic link, otherwise
  the write is refused with one line.
- `.<out-name>.<random>.old/`: the previous output, moved aside under a fresh unique name while
  the new one is renamed in, then deleted. The previous output is replaced only if it is an
  earlier output of the same kind (`refuse_foreign_output`).
- `.<file-name>.<random>` and `.<file-name>.<random>.partial`: unique temporary files for file
  outputs (created exclusively by `tempfile`, so they never collide with an existing file).

An output path that is a symbolic link is refused: renaming a finished folder into place would
replace the link, not write into its target.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from storage.errors import LessonsError

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
WORK_MARKER = ".lessons"  # the folder inside every work folder lessons creates: its ownership mark


class OutputError(LessonsError, OSError):
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
        return (
            f"{path}: not writable (a part of the path is a file, not a folder); choose another output path"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: not writable ({exc.strerror}); choose a writable output path"
    return f"{path}: {exc.strerror or exc}"


def refuse_symlink(path: str | Path, what: str) -> None:
    """Refuse an output path that is a symbolic link (dangling or not).

    Raises:
        OutputError: `path` is a symbolic link.
    """
    path = Path(path)
    if path.is_symlink():
        target = os.readlink(path)
        raise OutputError(
            errno.EEXIST,
            f"{path}: is a symbolic link (to {target}), not {what}; lessons "
            "replaces an output by renaming a finished one into place, which "
            "would replace the link: give the link's target as the output "
            "path, or remove the link",
        )


def _marked(folder: Path, marker: str, signature: str | None) -> bool:
    """Whether `folder/marker` is a file and, with `signature`, a JSON object holding that key."""
    if not (folder / marker).is_file():
        return False
    if signature is None:
        return True
    try:
        content = json.loads((folder / marker).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and signature in content


def refuse_foreign_output(out: str | Path, marker: str, what: str, *, signature: str | None = None) -> None:
    """Refuse to replace `out` unless it is absent or an earlier output of the same kind: a folder
    (not a symbolic link) holding the file `marker` (a JSON object with the key `signature`, when
    given). lessons replaces only what it wrote; a user's file or folder given as an output path
    by mistake is never deleted.

    Raises:
        OutputError: `out` is a symbolic link, or exists and is not such a folder.
    """
    out = Path(out)
    refuse_symlink(out, what)
    if out.exists() and not (out.is_dir() and _marked(out, marker, signature)):
        kind = "a folder" if out.is_dir() else "a file"
        raise OutputError(
            errno.EEXIST,
            f"{out}: exists and is {kind}, not {what}; lessons only replaces "
            "its own outputs: choose another output path or move it away",
        )


def owns_work_dir(path: str | Path) -> bool:
    """Whether `path` is a work folder lessons created: a real folder holding `WORK_MARKER/`."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / WORK_MARKER).is_dir()


def discard_work_dir(path: str | Path) -> None:
    """Delete the work folder `path` if it exists, but only if lessons created it.

    Raises:
        OutputError: `path` exists (or is a link) and is not a work folder of lessons; nothing
            is deleted.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not owns_work_dir(path):
        kind = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "a file"
        raise OutputError(
            errno.EEXIST,
            f"{path}: exists and is {kind} that lessons did not create (no "
            f"{WORK_MARKER}/ inside); lessons uses this name for unfinished "
            "output and deletes only its own: move it away and run again",
        )
    shutil.rmtree(path)


def create_work_dir(path: str | Path) -> Path:
    """Create the empty work folder `path` with its ownership marker (discarding an earlier one).

    Raises:
        OutputError: see `discard_work_dir`; OSError: the folder cannot be created.
    """
    path = Path(path)
    discard_work_dir(path)
    path.mkdir(parents=True)
    (path / WORK_MARKER).mkdir()
    return path


_HELD_LOCKS: set[int] = set()  # descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (ffcv's and dask's worker pools), close the inherited lock descriptors:
    a flock belongs to the open file, so a child that outlived the writer's `with` block would
    otherwise keep `<out>.lock` held and refuse the next run as "another process is writing"."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


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
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(
                exc.errno,
                f"{lock_path}: is a symbolic link; lessons uses this name as the "
                "lock of its output: remove the link and run again",
            ) from exc
        if exc.errno == errno.EISDIR:
            raise OutputError(
                exc.errno,
                f"{lock_path}: is a folder; lessons uses this name as the lock "
                "of its output: move it away and run again",
            ) from exc
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
        _HELD_LOCKS.add(fd)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # releases the flock; the file stays (unlinking it would race a waiter)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_HEADING = b"# Lessons report"


def _looks_like_ours(path: Path) -> bool:
    """Whether the existing file `path` is of the kind lessons writes under its suffix: JSON for
    `.json`, a PNG for `.png`, a lessons report for `.md`, a zip archive (`torch.save`) for `.pt`
    (the training stages check a checkpoint's content further). Other suffixes: never."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            json.loads(path.read_bytes())
            return True
        with open(path, "rb") as f:
            head = f.read(max(len(PNG_MAGIC), len(REPORT_HEADING)))
        prefix = {".png": PNG_MAGIC, ".md": REPORT_HEADING, ".pt": b"PK\x03\x04"}.get(suffix)
        return prefix is not None and head.startswith(prefix)
    except (OSError, ValueError):
        return False


def refuse_foreign_file(path: str | Path) -> None:
    """Refuse a file output path holding something lessons would not have written there.

    A symbolic link is refused (the atomic rename would replace the link); a folder is refused;
    an existing file is replaced only when it is of the kind lessons writes under that suffix
    (`_looks_like_ours`: e.g. JSON for a metrics file, a lessons report for `summary.md`).

    Raises:
        OutputError: naming the path and the fix.
    """
    path = Path(path)
    if path.is_symlink():
        raise OutputError(
            errno.EEXIST,
            f"{path}: is a symbolic link (to {os.readlink(path)}); lessons replaces "
            "a file output by renaming a new file into place, which would replace "
            "the link: give the link's target as the output path, or remove the link",
        )
    if path.is_dir():
        raise OutputError(
            errno.EISDIR,
            f"{path}: is a folder, and lessons writes a file here; choose "
            "another output path or move the folder away",
        )
    if path.exists() and not _looks_like_ours(path):
        raise OutputError(
            errno.EEXIST,
            f"{path}: exists and is not a {path.suffix or 'suffix-less'} file lessons "
            "writes; lessons only replaces its own outputs: choose another output "
            "path or move the file away",
        )


def writable_parent(path: str | Path) -> None:
    """Create the folder of `path` now and check it is writable, so an unwritable output fails
    before any work.

    Raises:
        OutputError: the folder cannot be created (e.g. a regular file is in the way) or is not
            writable.
    """
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise OutputError(exc.errno, describe_os_error(exc, path)) from exc


def ensure_parents(*paths: str | Path) -> None:
    """Check the file outputs `paths` before any work: whatever is at each path must be
    replaceable (`refuse_foreign_file`) and its folder writable (`writable_parent`).

    Raises:
        OutputError: see `refuse_foreign_file` and `writable_parent`.
    """
    for path in paths:
        refuse_foreign_file(path)
        writable_parent(path)


def check_folder_output(out: str | Path, marker: str, what: str) -> None:
    """Check a folder output (a store) before any work: `out` is absent or an earlier output of
    the same kind, `<out>.partial` is absent or lessons' own, and the folder of `out` is writable.

    Raises:
        OutputError: see `refuse_foreign_output`, `discard_work_dir` and `writable_parent`.
    """
    refuse_foreign_output(out, marker, what)
    partial = partial_path(out)
    if (partial.exists() or partial.is_symlink()) and not owns_work_dir(partial):
        discard_work_dir(partial)  # refuses, in one line, without deleting anything
    writable_parent(out)


def temporary_sibling(path: str | Path) -> Path:
    """A new, empty, uniquely named file `.<name>.<random>.partial` beside `path`, for a writer
    that must open its output by name (ffcv, h5py) before renaming it into place.

    The file is created exclusively, so no existing file is ever reused or truncated.

    Raises:
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp's 0600 would hide outputs from other users
    return Path(name)


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


def replace_dir(
    src: str | Path, dst: str | Path, *, marker: str, what: str, signature: str | None = None
) -> None:
    """Move the finished work folder `src` to `dst`, replacing an older `dst` only once `src` is in.

    The old `dst` (checked again to be an earlier output, see `refuse_foreign_output`) is first
    renamed aside to a fresh unique name `.<dst-name>.<random>.old`, so at every instant either
    the old or the new output exists under `dst`'s name or beside it; it is deleted only after
    the new one is in place. `src`'s ownership marker (`WORK_MARKER/`) is removed last.

    Raises:
        OutputError: `src` is not a work folder of lessons, or `dst` is not an earlier output
            (see `refuse_foreign_output`).
        OSError: a rename failed (the old `dst` is back in place).
    """
    src, dst = Path(src), Path(dst)
    if not owns_work_dir(src):
        raise OutputError(errno.EEXIST, f"{src}: is not a work folder of lessons; refusing to publish it")
    refuse_foreign_output(dst, marker, what, signature=signature)
    aside = None
    if dst.exists():
        # A new empty folder of a unique name: rename(2) may replace an empty folder, so the old
        # output lands there and no existing path is ever overwritten.
        aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        try:
            os.replace(dst, aside)
        except OSError:
            aside.rmdir()
            raise
    try:
        os.replace(src, dst)
    except OSError:
        if aside is not None:
            os.replace(aside, dst)
        raise
    shutil.rmtree(dst / WORK_MARKER, ignore_errors=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
        if aside.exists():
            logger.warning("%s: could not delete the previous output moved aside to %s", dst, aside)

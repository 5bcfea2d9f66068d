"""The write lock of an index directory: one writer at a time, and a clear error for the second instead of two
processes interleaving their files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

try:
    import fcntl
except ImportError:  # Windows: filelock locks with msvcrt there; the probe below is not available
    fcntl = None

LOCK_NAME = ".dmin.lock"  # inside the index directory; never part of the index's files


class IndexBusyError(RuntimeError):
    """Another process holds the write lock of an index directory."""


def busy_error(directory: str | os.PathLike) -> IndexBusyError:
    return IndexBusyError(
        f"another process is writing the attribution index in {directory} (it holds {LOCK_NAME}); wait for it "
        "to finish, or write to another directory"
    )


def _lock(directory: Path) -> FileLock:
    return FileLock(directory / LOCK_NAME, is_singleton=True)


def lock_held_elsewhere(directory: str | os.PathLike) -> bool:
    """Whether another process holds the write lock of ``directory`` now. Writes nothing (the lock file is opened
    read-only, and not created), so it also works on a read-only copy."""
    path = Path(directory) / LOCK_NAME
    if fcntl is None or not path.is_file() or _lock(Path(directory)).is_locked:  # held by this process: not busy
        return False
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # filelock holds an exclusive flock on the file while a writer works
        return True
    finally:
        os.close(descriptor)  # also drops the shared lock taken above
    return False


def check_not_busy(directory: str | os.PathLike) -> None:
    """Raises :class:`IndexBusyError` when another process holds the write lock of ``directory``."""
    if lock_held_elsewhere(directory):
        raise busy_error(directory)


@contextmanager
def index_write_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Holds the write lock of ``directory`` (created if needed) for the duration of the block. Re-entrant within
    a process; raises :class:`IndexBusyError` at once when another process holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = _lock(directory)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise busy_error(directory) from None
    try:
        yield
    finally:
        lock.release()

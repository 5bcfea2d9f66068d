"""The write lock of an index directory: one writer at a time, and a clear error for the second instead of two
processes interleaving their files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = ".dmin.lock"  # inside the index directory; never part of the index's files


class IndexBusyError(RuntimeError):
    """Another process holds the write lock of an index directory."""


@contextmanager
def index_write_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Holds the write lock of ``directory`` (created if needed) for the duration of the block. Re-entrant within
    a process; raises :class:`IndexBusyError` at once when another process holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / LOCK_NAME, is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise IndexBusyError(
            f"another process is writing the attribution index in {directory} (it holds {LOCK_NAME}); wait for it "
            "to finish, or write to another directory"
        ) from None
    try:
        yield
    finally:
        lock.release()

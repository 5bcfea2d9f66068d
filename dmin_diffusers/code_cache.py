"""An on-disk cache of the compressor's codes, so that a second process tracking a large model starts at once.

The bucket/sign codes of :class:`~dmin_diffusers.sketch.SketchProjector` are a function of ``(seed, K, D)`` only
(the total number of tracked elements; how they split into parameters does not matter). Deriving them for full
tracking of Stable Diffusion 1.5's UNet (``D`` = 860M) takes 15-40 s on one CPU thread (about 500 s before the numpy
kernel); opening and validating a cached file takes under a second when it is in the page cache, a few seconds
from disk. The cache is used only for codes kept in CPU memory and only from
:data:`MIN_CACHED_ELEMENTS` elements on (smaller models derive their codes in well under a second).

Where: ``$DMIN_DIFFUSERS_CACHE/codes`` when the environment variable :data:`CACHE_ENV` is set (``off``, ``0``,
``false`` or an empty value turn the cache off), else ``$XDG_CACHE_HOME/dmin_diffusers/codes``, else
``~/.cache/dmin_diffusers/codes``. Each entry takes 4 bytes per tracked element (3.2 GiB for SD 1.5); deleting
files there is always safe.

Format of ``<key>.codes``: the 8 bytes ``DMINCODE``, a little-endian uint32 ``n``, ``n`` bytes of UTF-8 JSON (the
header: format version, key, seed, K, D, the data offset and checksums), zero padding up to the data offset (a
multiple of 4096), then ``D`` little-endian int32 codes. Files are written to a temporary name and renamed, so a
writer that is interrupted never leaves a file that loads. On load the header must match, the file size must be
exact, the sum of all codes must match the header's, and the codes at a few hundred random indices must equal a
fresh derivation; otherwise the file is ignored with a warning and the codes are derived again. A read-only, full
or missing cache directory only costs the derivation: the failure is logged and sketching goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .sketch import SketchProjector

logger = logging.getLogger(__name__)

#: environment variable naming dmin_diffusers' cache directory (codes go in its ``codes`` subdirectory)
CACHE_ENV = "DMIN_DIFFUSERS_CACHE"
#: codes of fewer tracked elements than this (64M, 256 MiB of codes, about 2 s to derive) are never cached
MIN_CACHED_ELEMENTS = 1 << 26
#: bumped whenever the derivation or the file layout changes; part of the key
FORMAT_VERSION = 1

_MAGIC = b"DMINCODE"
_ALIGN = 4096
_RANDOM_CHECKS = 256
_WRITE_CHUNK = 1 << 24  # elements per write call
_SPARE_BYTES = 1 << 30  # a file is written only if this much disk space would remain free
_STALE_SECONDS = 3600  # temporary files untouched for this long were left by a killed writer
_DISABLED = {"", "0", "off", "false", "no", "none"}


def code_cache_dir() -> Path | None:
    """The directory holding cached codes, or ``None`` when :data:`CACHE_ENV` turns the cache off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        if value.strip().lower() in _DISABLED:
            return None
        return Path(value).expanduser() / "codes"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dmin_diffusers" / "codes"


def cache_key(seed: int, dim: int, total: int) -> str:
    """The hex key of the codes of ``total`` elements sketched to ``dim`` buckets under ``seed``."""
    description = json.dumps({"format": FORMAT_VERSION, "seed": seed, "dim": dim, "total": total}, sort_keys=True)
    return hashlib.sha256(description.encode()).hexdigest()


def cache_path(projector: SketchProjector) -> Path | None:
    """Where the codes of ``projector`` are (or would be) cached; ``None`` when the cache is off."""
    directory = code_cache_dir()
    if directory is None:
        return None
    return directory / f"{cache_key(projector.seed, projector.dim, projector.total)[:32]}.codes"


def _checksum(codes: np.ndarray) -> int:
    """The sum of the codes' pairs read as uint64, modulo ``2**64`` (one pass at memory speed; catches truncation,
    zeroed pages and any single changed code). Additive over pieces of even length."""
    even = codes.shape[0] - codes.shape[0] % 2
    total = int(np.add.reduce(codes[:even].view(np.uint64), dtype=np.uint64)) if even else 0
    if even < codes.shape[0]:
        total += int(codes[-1]) % (1 << 32)
    return total % (1 << 64)


def _header(projector: SketchProjector, checksum: int) -> bytes:
    """The first :data:`_ALIGN` bytes of a file: magic, length and JSON header, zero padding."""
    header = {
        "format": FORMAT_VERSION,
        "key": cache_key(projector.seed, projector.dim, projector.total),
        "seed": projector.seed,
        "dim": projector.dim,
        "total": projector.total,
        "checksum": checksum,
        "data_offset": _ALIGN,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    body = json.dumps(header, sort_keys=True).encode()
    prefix = _MAGIC + struct.pack("<I", len(body)) + body
    if len(prefix) > _ALIGN:
        raise ValueError("the header does not fit its page")
    return prefix + bytes(_ALIGN - len(prefix))


def load_codes(projector: SketchProjector) -> np.ndarray | None:
    """The cached codes of every tracked element of ``projector`` (int32, memory-mapped copy-on-write, so that
    processes on one machine share one copy), or ``None`` when there is no valid file; an invalid file is
    reported with a warning."""
    path = cache_path(projector)
    if path is None or sys.byteorder != "little":
        return None
    try:
        with open(path, "rb") as file:
            start = file.read(len(_MAGIC) + 4)
            if len(start) < len(_MAGIC) + 4 or start[: len(_MAGIC)] != _MAGIC:
                raise ValueError("not a code cache file")
            (length,) = struct.unpack("<I", start[len(_MAGIC) :])
            header = json.loads(file.read(length))
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        logger.warning("ignoring the cached compressor codes %s (%s); deriving them again", path, error)
        return None
    try:
        expected = {"format": FORMAT_VERSION, "key": cache_key(projector.seed, projector.dim, projector.total),
                    "seed": projector.seed, "dim": projector.dim, "total": projector.total}
        mismatched = [name for name, value in expected.items() if header.get(name) != value]
        if mismatched:
            raise ValueError(f"header fields {mismatched} do not match")
        offset = header["data_offset"]
        if size != offset + 4 * projector.total:
            raise ValueError(f"{size} bytes instead of {offset + 4 * projector.total}")
        codes = np.memmap(path, dtype="<i4", mode="c", offset=offset, shape=(projector.total,))
        if _checksum(codes) != header["checksum"]:
            raise ValueError("the checksum of the codes does not match the header")
        rng = np.random.default_rng()
        indices = np.concatenate([[0, projector.total - 1], rng.integers(0, projector.total, _RANDOM_CHECKS)])
        if not np.array_equal(np.asarray(codes[indices]), projector.codes_at(indices)):
            raise ValueError("the codes differ from a fresh derivation")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:  # AttributeError: not a JSON object
        logger.warning("ignoring the cached compressor codes %s (%s); deriving them again", path, error)
        return None
    logger.info("loaded the compressor's codes (%.2f GiB) from %s", 4 * projector.total / 2**30, path)
    return codes


def _remove_stale(directory: Path) -> None:
    now = time.time()
    for leftover in directory.glob(".*.codes.tmp"):
        try:
            if now - leftover.stat().st_mtime > _STALE_SECONDS:
                leftover.unlink()
        except OSError:
            pass


def _give_up(directory: Path, error: Exception) -> None:
    logger.warning("could not cache the compressor's codes in %s (%s); the next process will derive them again",
                   directory, error)


class CodeWriter:
    """Writes one projector's codes to the cache piece by piece, in index order, while they are derived (so that
    the disk writes them back during the derivation), then :meth:`commit` flushes the file to disk and renames it
    into place. Any failure is logged once and turns the writer into a no-op: the caller never sees it."""

    def __init__(self, projector: SketchProjector, path: Path):
        self.projector, self.path = projector, path
        self.written = 0
        self._checksum = 0
        self._file = None
        self._temporary: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(path.parent)
            needed = _ALIGN + 4 * projector.total
            free = shutil.disk_usage(path.parent).free
            if free < needed + _SPARE_BYTES:
                raise OSError(f"only {free / 2**30:.1f} GiB free, {(needed + _SPARE_BYTES) / 2**30:.1f} GiB needed")
            descriptor, self._temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                                           suffix=".codes.tmp")
            self._file = os.fdopen(descriptor, "wb")
            self._file.write(bytes(_ALIGN))  # the header goes here once the checksum is known
        except OSError as error:
            self._fail(error)

    @property
    def active(self) -> bool:
        """Whether the writer is still writing (no failure so far, not committed)."""
        return self._file is not None

    def _fail(self, error: Exception) -> None:
        _give_up(self.path.parent, error)
        self.abort()

    def abort(self) -> None:
        """Stops writing and removes the temporary file (nothing is left in the cache)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._temporary is not None:
            try:
                os.unlink(self._temporary)
            except OSError:
                pass
            self._temporary = None

    def write(self, codes: np.ndarray) -> None:
        """Appends the int32 codes of the next indices (every piece but the last of even length)."""
        if not self.active:
            return
        if codes.dtype != np.int32 or self.written % 2:
            raise ValueError("pieces must be int32, and only the last one of odd length")
        try:
            for start in range(0, codes.shape[0], _WRITE_CHUNK):
                self._file.write(memoryview(codes[start : start + _WRITE_CHUNK]))
        except OSError as error:
            self._fail(error)
            return
        self._checksum = (self._checksum + _checksum(codes)) % (1 << 64)
        self.written += codes.shape[0]

    def commit(self) -> Path | None:
        """Writes the header, flushes the file to disk and renames it into place; returns the path, or ``None``
        where the cache could not be written."""
        if not self.active:
            return None
        if self.written != self.projector.total:
            self.abort()
            raise ValueError(f"{self.written} codes written, {self.projector.total} expected")
        try:
            self._file.seek(0)
            self._file.write(_header(self.projector, self._checksum))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self._temporary, self.path)
            self._temporary = None
        except OSError as error:
            self._fail(error)
            return None
        logger.info("cached the compressor's codes (%.2f GiB) in %s", 4 * self.written / 2**30, self.path)
        return self.path


def open_writer(projector: SketchProjector) -> CodeWriter | None:
    """A :class:`CodeWriter` for ``projector``'s codes, or ``None`` where the cache is off or cannot be written
    (logged)."""
    path = cache_path(projector)
    if path is None or sys.byteorder != "little":
        return None
    writer = CodeWriter(projector, path)
    return writer if writer.active else None


def store_codes(projector: SketchProjector, codes: np.ndarray) -> Path | None:
    """Writes every tracked element's codes (int32, ``projector.total`` of them) to the cache at once; returns
    the path, or ``None`` where the cache is off or the write failed, which is logged and otherwise ignored."""
    if codes.dtype != np.int32 or codes.shape != (projector.total,):
        raise ValueError(f"expected {projector.total} int32 codes, got {codes.dtype} {codes.shape}")
    writer = open_writer(projector)
    if writer is None:
        return None
    writer.write(codes)
    return writer.commit()

"""On-disk rows: safetensors shards listed in a JSON manifest.

A shard holds ``vectors`` (rows x row_dim, in the storage dtype) and ``row_ids`` (int64 dataset row numbers).
Shards and manifests are written to a temporary name, synced and renamed, and a shard only counts once a manifest
lists it, so a process interrupted or killed at any moment leaves a consistent store that can be resumed. A
shard's name holds a digest of its content: writing the same rows again gives the same name (a retried write
never stores a row twice), and rows of another index never take the name of a file an older manifest lists.

A shard also holds ``row_digests``: 8 bytes for each row, so a reader can check exactly the rows it reads (a
query reads a few dozen of millions) instead of hashing whole files. Shards written since 0.3 use ``linear64-v1``
(named in their manifest entry, ``"row_digest"``): a keyed linear hash, the row's stored bits read as 32-bit words
``w_i`` and its id, ``(k_0 * id + sum_i k_i * w_i) mod 2**64``, with fixed odd 64-bit keys ``k_i`` derived from
a constant string, computed for a whole chunk by a few vectorised multiply-and-sum passes (about a sixth of the
cost of converting the chunk to float32 for a query). It detects any change of one word (2 float16 values) or of
the id, any two flipped bits, and any other change unless the changed words cancel out modulo 2**64. Shards
written before (no ``"row_digest"`` field) hold blake2b-64 of the id and values, and are still checked with it.

The manifest lists the sha256 and size of every shard and, under ``"files"``, of the other files of an index;
:func:`verify_files` and :func:`check_shard_layout` check them before anything is read, and :class:`VectorStore`
checks every row it reads against its digest (a shard written before digests existed: the shard's sha256, the
first time it is read) and refuses non-finite and all-zero values.

Readers work on a snapshot (:class:`PinnedFiles`): the files the manifest lists are opened once, when the store is
opened, and every later read goes to those same files, so a writer replacing the directory's files meanwhile
never mixes two indices into one ranking. Every file is read as a regular file of a bounded size.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import STORAGE_DTYPES, DMinConfig
from .locks import lock_held_elsewhere

#: rows read into memory at a time when the store is streamed (exact search, fits, HNSW builds)
CHUNK_ROWS = 8192

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARD_DIR = "vectors"
ROW_DIGEST_BYTES = 8
#: the row digest new shards use, recorded as ``"row_digest"`` in their manifest entries (see :func:`row_digests`)
ROW_DIGEST = "linear64-v1"
#: a shard entry without ``"row_digest"`` (written before 0.3) holds blake2b digests
LEGACY_ROW_DIGEST = "blake2b"
STORE_VERSION = 2  # 2: shards carry row digests and the manifest a checksum of itself
#: ``manifest.json`` lists about 200 bytes a shard (name, size, rows, sha256, indented): 64 MiB is 300k shards, or
#: 300 million rows at the default 1,024 rows a shard; anything larger is not a manifest this library wrote
MAX_MANIFEST_BYTES = 64 << 20
#: small JSON files that no manifest lists (a store being built, an index written before checksums existed)
MAX_SMALL_JSON_BYTES = 16 << 20
TEMPORARY_SUFFIX = ".tmp"
_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPES}
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class IndexIntegrityError(ValueError):
    """A file of an index is missing, truncated, or not the file that ``manifest.json`` lists."""


class IndexChangedError(RuntimeError):
    """Another process replaced the files of an index while it was being opened or read."""


class DiskFullError(OSError):
    """A write failed for lack of space (``ENOSPC``/``EDQUOT``); what was finished before it is kept."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextmanager
def disk_full_guard(directory: str | os.PathLike, kept: str) -> Iterator[None]:
    """Turns a disk-full ``OSError`` raised in the block into a :class:`DiskFullError` naming ``directory`` and
    saying what is kept (``kept``)."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as error:
        if error.errno not in _DISK_FULL:
            raise
        raise DiskFullError(
            f"no space left on the device of {directory} ({error.strerror or error}); {kept}: free some space and "
            "run the same call again"
        ) from error


# ------------------------------------------------------------------------------------------------ files


def _open_regular(path: str | os.PathLike, name: str | None = None) -> io.FileIO:
    """Opens a file for reading, refusing (:class:`IndexIntegrityError`) anything but a regular file without
    blocking on it (a FIFO, a device, a directory). Symbolic links are followed (Hub snapshots are links)."""
    path = Path(path)
    name = name or path.name
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise IndexIntegrityError(f"{name} in {path.parent} is a directory, not a file") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise IndexIntegrityError(f"{name} in {path.parent} is not a regular file (a device, FIFO or socket)")
    return io.FileIO(descriptor, "rb", closefd=True)


def read_bounded(path: str | os.PathLike, limit: int, name: str | None = None, where: str | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; :class:`IndexIntegrityError` otherwise."""
    name = name or Path(path).name
    with _open_regular(path, name) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise IndexIntegrityError(
            f"{name} in {where or Path(path).parent} has more than {limit} bytes: not a file of an attribution index"
        )
    return data


def read_json(path: str | os.PathLike, limit: int = MAX_SMALL_JSON_BYTES, name: str | None = None,
              where: str | None = None) -> object:
    """A JSON file read with a bound (:func:`read_bounded`); :class:`IndexIntegrityError` when it does not parse."""
    name = name or Path(path).name
    where = where or str(Path(path).parent)
    try:
        return json.loads(read_bounded(path, limit, name, where).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise IndexIntegrityError(f"{name} in {where} is not valid JSON ({error})") from None


def read_json_object(path: str | os.PathLike, name: str, where: str, limit: int = MAX_SMALL_JSON_BYTES) -> dict:
    """A JSON object read with a bound (:func:`read_json`); :class:`IndexIntegrityError` for any other value."""
    value = read_json(path, limit, name, where)
    if not isinstance(value, dict):
        raise IndexIntegrityError(f"{name} in {where} is not a JSON object")
    return value


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with _open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def sync_file(path: str | os.PathLike) -> None:
    """Flushes a written file to the disk (before it is renamed into place)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Writes JSON to a temporary name, syncs it and renames it over ``path``; on any failure the temporary file
    is removed and ``path`` is left as it was."""
    temporary = f"{path}{TEMPORARY_SUFFIX}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise


def save_tensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """:func:`safetensors.torch.save_file` to a temporary name, synced, then renamed over ``path``."""
    temporary = f"{path}{TEMPORARY_SUFFIX}"
    try:
        save_file(tensors, temporary, metadata=metadata)
        sync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise


_PROC_FD = Path("/proc/self/fd")


def _descriptor_budget() -> int:
    """How many files all snapshots together may keep open: half the soft limit (the rest is the process's)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(16, soft // 2) if soft != resource.RLIM_INFINITY else 4096
    except (ImportError, ValueError, OSError):
        return 256


_held = {"count": 0, "budget": _descriptor_budget() if _PROC_FD.is_dir() else 0}
_held_lock = threading.Lock()


def _take_descriptor() -> bool:
    with _held_lock:
        if _held["count"] >= _held["budget"]:
            return False
        _held["count"] += 1
        return True


def _return_descriptors(count: int) -> None:
    with _held_lock:
        _held["count"] -= count


class PinnedFiles:
    """The files of an index as they were when it was opened.

    Each file is opened once and kept open; later reads reopen it through ``/proc/self/fd`` (Linux), so they read
    exactly the file that was pinned even after a writer renamed another file over its name. Where that is not
    possible (no ``/proc``, or more files open than half the open-file limit), the file's identity (device,
    inode, size, modification time) is recorded instead, and :meth:`check` raises :class:`IndexChangedError`
    after a read when the name no longer refers to it.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._files: dict[str, tuple[io.FileIO | None, os.stat_result]] = {}
        self._open = 0

    def pin(self, name: str) -> bool:
        """Pins ``name`` (relative to the directory); ``False`` if it does not exist."""
        if name in self._files:
            return True
        try:
            handle = _open_regular(self.directory / name, name)
        except (FileNotFoundError, NotADirectoryError):
            return False
        status = os.fstat(handle.fileno())
        if _take_descriptor():
            self._open += 1
        else:
            handle.close()
            handle = None
        self._files[name] = (handle, status)
        return True

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def size(self, name: str) -> int:
        return self._files[name][1].st_size

    def path(self, name: str) -> str:
        """A path that opens the pinned file."""
        handle, _ = self._files[name]
        if handle is not None and not handle.closed:
            return str(_PROC_FD / str(handle.fileno()))
        return str(self.directory / name)

    def check(self, name: str) -> None:
        """After reading ``name`` through :meth:`path`: raises :class:`IndexChangedError` if what was read may not
        be the pinned file (only possible for files that are not held open)."""
        handle, pinned = self._files[name]
        if handle is not None:
            return
        try:
            now = os.stat(self.directory / name)
        except OSError:
            now = None
        if now is None or _identity(now) != _identity(pinned):
            raise changed_error(self.directory, f"{name} was replaced")

    def unchanged(self, name: str) -> bool:
        """Whether ``name`` in the directory is still the pinned file."""
        try:
            return _identity(os.stat(self.directory / name))[:2] == _identity(self._files[name][1])[:2]
        except OSError:
            return False

    def close(self) -> None:
        for handle, _ in self._files.values():
            if handle is not None:
                handle.close()
        self._files.clear()
        _return_descriptors(self._open)
        self._open = 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the module's globals may be gone; the files close anyway
            pass


def _identity(status: os.stat_result) -> tuple:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def changed_error(directory: str | os.PathLike, detail: str) -> IndexChangedError:
    return IndexChangedError(
        f"the attribution index in {directory} changed while it was being read ({detail}): another process is "
        "writing it; open it again (e.g. load_attribution_index) once that process has finished"
    )


_OPEN_ATTEMPTS = 40
_OPEN_RETRY_SECONDS = 0.05


def open_snapshot(directory: str | os.PathLike, extra: Collection[str] = ()) -> tuple[dict | None, PinnedFiles]:
    """Reads ``manifest.json`` and pins it with every file it lists (and the ``extra`` names that exist), retrying
    while another process replaces them. Returns ``(manifest, files)``; the manifest is ``None`` when there is
    none (a store still being built). Raises :class:`IndexChangedError` when the directory keeps changing."""
    directory = Path(directory)
    detail = "its manifest kept being replaced"
    for attempt in range(_OPEN_ATTEMPTS):
        files = PinnedFiles(directory)
        if attempt:
            time.sleep(_OPEN_RETRY_SECONDS)
        if not files.pin(MANIFEST_NAME):
            if lock_held_elsewhere(directory):  # a writer has removed the manifest and will write a new one
                detail = "it has no manifest while another process holds its write lock"
                continue
            for name in extra:
                files.pin(name)
            if not (directory / MANIFEST_NAME).exists():
                return None, files
            files.close()
            continue
        manifest = parse_manifest(
            read_bounded(files.path(MANIFEST_NAME), MAX_MANIFEST_BYTES, MANIFEST_NAME, str(directory)), directory
        )
        for name in [*manifest_entries(manifest), *extra]:
            files.pin(name)
        if files.unchanged(MANIFEST_NAME):  # writers replace the manifest first and write it last
            return manifest, files
        files.close()
    raise changed_error(directory, detail)


# ------------------------------------------------------------------------------------------------ manifests


def _manifest_digest(manifest: dict) -> str:
    content = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: str | os.PathLike, manifest: dict) -> dict:
    """Writes ``manifest.json`` with a ``checksum`` of its own content, so that a damaged manifest is detected
    like any other file. Returns the written manifest."""
    manifest = {key: value for key, value in manifest.items() if key != "checksum"}
    manifest["checksum"] = _manifest_digest(manifest)
    write_json_atomic(Path(directory) / MANIFEST_NAME, manifest)
    return manifest


def parse_manifest(data: bytes, directory: str | os.PathLike) -> dict:
    """The manifest in ``data``, checked against its own checksum (:class:`IndexIntegrityError` otherwise)."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise IndexIntegrityError(f"{MANIFEST_NAME} in {directory} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise IndexIntegrityError(f"{MANIFEST_NAME} in {directory} is not a JSON object")
    # a version-2 manifest always has its checksum; one written before had none
    needs_checksum = "checksum" in manifest or manifest.get("version", 1) != 1
    if needs_checksum and manifest.get("checksum") != _manifest_digest(manifest):
        raise IndexIntegrityError(
            f"{MANIFEST_NAME} in {directory} does not match its own checksum: the file was modified or damaged"
        )
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a store, ``None`` if there is none; raises :class:`IndexIntegrityError` when it is not
    valid JSON, larger than :data:`MAX_MANIFEST_BYTES`, not a regular file or does not match its own checksum
    (manifests written before the checksum existed have none)."""
    path = Path(directory) / MANIFEST_NAME
    try:
        data = read_bounded(path, MAX_MANIFEST_BYTES, MANIFEST_NAME, str(directory))
    except FileNotFoundError:
        return None
    return parse_manifest(data, directory)


# ------------------------------------------------------------------------------------------------ checksums


def file_record(path: str | os.PathLike) -> dict:
    """``{"sha256", "bytes"}`` of a file, as the manifest lists it."""
    return {"sha256": file_sha256(path), "bytes": Path(path).stat().st_size}


def record_files(directory: str | os.PathLike, names: list[str]) -> dict:
    """Lists the checksum and size of each of ``names`` (files beside the shards: config, dataset reference,
    HNSW file) under ``"files"`` in ``manifest.json``; a name whose file does not exist is dropped from the list.
    Returns the updated manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}")
    files = dict(manifest.get("files", {}))
    for name in names:
        if (directory / name).is_file():
            files[name] = file_record(directory / name)
        else:
            files.pop(name, None)
    manifest["files"] = dict(sorted(files.items()))
    return write_manifest(directory, manifest)


def _checked_name(name: object) -> str:
    """A manifest entry must name a file inside the index directory."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or ".." in Path(name).parts:
        raise IndexIntegrityError(f"{MANIFEST_NAME} lists an invalid file name {name!r}")
    return name


def manifest_entries(manifest: dict) -> dict[str, dict]:
    """Every file the manifest vouches for (shards and ``"files"``), by relative path."""
    try:
        entries = {_checked_name(shard["file"]): shard for shard in manifest["shards"]}
        entries.update({_checked_name(name): record for name, record in manifest.get("files", {}).items()})
        for name, record in entries.items():
            if not isinstance(record.get("bytes"), int) or not isinstance(record.get("sha256"), str):
                raise IndexIntegrityError(f"{MANIFEST_NAME} has no valid size and sha256 for {name}")
    except (KeyError, TypeError, AttributeError) as error:
        raise IndexIntegrityError(f"{MANIFEST_NAME} is malformed ({type(error).__name__}: {error})") from None
    return entries


def check_file_digest(path: str | os.PathLike, record: dict, name: str, where: str | None = None) -> None:
    """Raises :class:`IndexIntegrityError` when the file's sha256 is not the one ``record`` lists."""
    digest = file_sha256(path)
    if digest != record["sha256"]:
        raise IndexIntegrityError(
            f"{name} does not match its checksum in {MANIFEST_NAME} (sha256 {digest[:16]}..., expected "
            f"{record['sha256'][:16]}...): the file was modified or damaged (in {where or Path(path).parent})"
        )


def verify_files(
    directory: str | os.PathLike, manifest: dict, full: bool | Collection[str] = True, optional: tuple[str, ...] = (),
    files: PinnedFiles | None = None,
) -> None:
    """Checks every file the manifest lists: present (unless in ``optional``), of the listed size and, for the
    files in ``full`` (every file when ``True``), of the listed sha256. With ``files``, the pinned files are
    checked (see :func:`open_snapshot`). Raises :class:`IndexIntegrityError` naming the first bad file."""
    directory = Path(directory)
    own = files is None
    if own:
        files = PinnedFiles(directory)
        for name in manifest_entries(manifest):
            files.pin(name)
    try:
        for name, record in manifest_entries(manifest).items():
            if name not in files:
                if name in optional:
                    continue
                raise IndexIntegrityError(f"{name} is listed in {MANIFEST_NAME} but missing from {directory}")
            size = files.size(name)
            if size != record["bytes"]:
                raise IndexIntegrityError(
                    f"{name} has {size} bytes but {MANIFEST_NAME} lists {record['bytes']}: the file is truncated or "
                    f"was replaced (in {directory})"
                )
            if full is True or (full and name in full):
                check_file_digest(files.path(name), record, name, str(directory))
                files.check(name)
    finally:
        if own:
            files.close()


_LINEAR_KEY_SEED = b"dmin-diffusers row digest linear64-v1"


_DIGEST_BLOCK_ROWS = 256  # rows taken at a time, so that the temporary of a block stays in the core's cache


@functools.lru_cache(maxsize=8)
def _linear_keys(words: int) -> np.ndarray:
    """``words + 1`` odd uint64 keys (the row id's, then one per 32-bit word of a row), the same on every machine:
    shake-256 of a constant string, read little-endian, lowest bit set (a longer key list extends a shorter one)."""
    raw = hashlib.shake_256(_LINEAR_KEY_SEED).digest(8 * (words + 1))
    keys = np.frombuffer(raw, dtype="<u8").astype(np.uint64) | np.uint64(1)
    keys.flags.writeable = False
    return keys


def _row_words(vectors: torch.Tensor) -> np.ndarray:
    """``(rows, words)`` uint64: each row's stored bytes as little-endian 64-bit words, each the pair of 32-bit
    words ``low + 2**32 * high``, zero-padded to a whole word (the row size is fixed by the manifest, so padding
    never makes two stored rows alike, and a padded zero adds nothing to a digest)."""
    raw = vectors.contiguous().view(torch.uint8).numpy()
    if raw.shape[1] % 8:
        padded = np.zeros((raw.shape[0], -(-raw.shape[1] // 8) * 8), dtype=np.uint8)
        padded[:, : raw.shape[1]] = raw
        raw = padded
    return raw.view("<u8")


def _linear64_row_digests(row_ids: torch.Tensor, vectors: torch.Tensor) -> np.ndarray:
    """``(rows,)`` uint64: ``linear64-v1`` digests (:data:`ROW_DIGEST`), ``(k_0 id + sum_i k_i w_i) mod 2**64``
    over the row's 32-bit words ``w_i``, for a whole chunk in a few vectorised passes.

    The keys are odd and a word changes by less than ``2**32``, so any change of one word, and any two flipped
    bits anywhere in the row, change the digest (two changes cancel only if their keys agree on 33 low bits).
    Computed on 64-bit words ``W = low + 2**32 high``: ``k_low low + k_high high = k_low W + (k_high - 2**32
    k_low) high``, exact modulo 2**64 (integer arithmetic wraps around)."""
    words = _row_words(vectors)
    keys = _linear_keys(2 * words.shape[1])
    low_keys, high_keys = keys[1::2], keys[2::2]
    high_keys = high_keys - (low_keys << np.uint64(32))
    digests = row_ids.numpy().astype("<i8").view(np.uint64) * keys[0]
    for start in range(0, words.shape[0], _DIGEST_BLOCK_ROWS):
        block = words[start : start + _DIGEST_BLOCK_ROWS]
        digests[start : start + block.shape[0]] += block @ low_keys + (block >> np.uint64(32)) @ high_keys
    return digests


def _blake2b_row_digests(row_ids: torch.Tensor, vectors: torch.Tensor) -> np.ndarray:
    """``(rows, 8)`` uint8: blake2b-64 of each row's id (int64, little-endian) and its values as stored, the
    digest of shards written before 0.3 (one hash a row; only read now, never written)."""
    raw = vectors.contiguous().view(torch.uint8).numpy()
    ids = row_ids.numpy().astype("<i8")
    out = np.empty((len(ids), ROW_DIGEST_BYTES), dtype=np.uint8)
    for i in range(len(ids)):
        digest = hashlib.blake2b(ids[i : i + 1].tobytes(), digest_size=ROW_DIGEST_BYTES)
        digest.update(raw[i])
        out[i] = np.frombuffer(digest.digest(), dtype=np.uint8)
    return out


def row_digest_name(shard: dict) -> str:
    """The row digest a shard entry of the manifest names (:data:`LEGACY_ROW_DIGEST` when it names none);
    :class:`IndexIntegrityError` for one this version does not know (a newer library wrote the shard, or the
    entry is damaged), so that its rows are never read unchecked."""
    name = shard.get("row_digest", LEGACY_ROW_DIGEST)
    if name not in (ROW_DIGEST, LEGACY_ROW_DIGEST):
        raise IndexIntegrityError(
            f"{shard.get('file')} uses the row digest {name!r}, which this version of dmin-diffusers does not know "
            f"(it knows {ROW_DIGEST!r} and {LEGACY_ROW_DIGEST!r}): upgrade dmin-diffusers, or rebuild the index"
        )
    return name


def row_digests(row_ids: torch.Tensor, vectors: torch.Tensor, digest: str = ROW_DIGEST) -> torch.Tensor:
    """``(rows, 8)`` uint8: the ``digest`` (:data:`ROW_DIGEST` by default, or :data:`LEGACY_ROW_DIGEST`) of each
    row's id and its values as stored; ``linear64-v1`` as 8 little-endian bytes."""
    if digest == ROW_DIGEST:
        out = _linear64_row_digests(row_ids, vectors).astype("<u8", copy=False).view(np.uint8)
        return torch.from_numpy(out.reshape(len(row_ids), ROW_DIGEST_BYTES))
    if digest == LEGACY_ROW_DIGEST:
        return torch.from_numpy(_blake2b_row_digests(row_ids, vectors))
    raise ValueError(f"unknown row digest {digest!r} (known: {ROW_DIGEST!r}, {LEGACY_ROW_DIGEST!r})")


def check_row_digests(
    row_ids: torch.Tensor, vectors: torch.Tensor, stored: torch.Tensor, name: str, digest: str = ROW_DIGEST
) -> None:
    """Raises :class:`IndexIntegrityError` naming the first row whose values or id do not match its digest
    (``digest``: the one the shard's manifest entry names, :func:`row_digest_name`)."""
    if digest == ROW_DIGEST:
        expected = _linear64_row_digests(row_ids, vectors)
        found = np.ascontiguousarray(stored.numpy()).view("<u8").reshape(-1)
        bad = torch.from_numpy(expected != found)
    else:
        bad = (row_digests(row_ids, vectors, digest) != stored).any(dim=1)
    if bool(bad.any()):
        row = int(row_ids[bad][0])
        raise IndexIntegrityError(
            f"row {row} in {name} does not match its checksum: the shard was modified or damaged"
        )


def check_shard_layout(
    directory: str | os.PathLike, shard: dict, row_dim: int, dtype: str, path: str | os.PathLike | None = None
) -> None:
    """Checks a shard's safetensors header against the manifest: ``vectors`` of ``(rows, row_dim)`` values in the
    storage dtype, ``row_ids`` of ``rows`` int64 values and, if present (shards written since version 0.2; always
    when the entry names a ``"row_digest"``), ``row_digests`` of ``(rows, 8)`` uint8 in a digest this version
    knows. safetensors validates the header itself. ``path``: where to read
    the shard (a pinned file), by default its name in ``directory``."""
    name = shard["file"]
    expected = {"vectors": (str(_DTYPES[dtype]), [shard["rows"], row_dim]), "row_ids": ("torch.int64", [shard["rows"]])}
    try:
        with safe_open(path or Path(directory) / name, framework="pt") as handle:
            found = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                dtype = piece.get_dtype()
                found[key] = (str(_SAFETENSORS_DTYPES.get(dtype, dtype)), list(piece.get_shape()))
    except Exception as error:  # safetensors raises its own error types for malformed headers
        raise IndexIntegrityError(f"{name} is not a readable safetensors file ({error})") from None
    if "row_digests" in found or "row_digest" in shard:  # an entry naming a digest needs its digests
        row_digest_name(shard)
        expected["row_digests"] = ("torch.uint8", [shard["rows"], ROW_DIGEST_BYTES])
    if found != expected:
        raise IndexIntegrityError(f"{name} holds {found}, but {MANIFEST_NAME} implies {expected}")


_SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64, "U8": torch.uint8
}


# ------------------------------------------------------------------------------------------------ writing


def _part_manifests(directory: Path) -> list[Path]:
    return sorted((directory / SHARD_DIR).glob("*.json"))


def _read_part(path: Path) -> dict:
    part = read_json(path, MAX_MANIFEST_BYTES, f"{SHARD_DIR}/{path.name}", str(path.parent.parent))
    if not isinstance(part, dict) or not isinstance(part.get("shards"), list):
        raise IndexIntegrityError(f"{SHARD_DIR}/{path.name} in {path.parent.parent} is not a list of shards")
    return part


def _shard_row_ids(directory: Path, shard: dict) -> list[int] | None:
    """The row ids of a listed shard, ``None`` when its file is missing, of another size or unreadable (its rows
    are then computed again: a resume is never blocked by a shard that a crash or a user removed)."""
    path = directory / shard["file"]
    try:
        if os.stat(path).st_size != shard["bytes"]:
            return None
        with safe_open(path, framework="pt") as handle:
            row_ids = handle.get_tensor("row_ids").tolist()
    except Exception:  # missing, or not a readable safetensors file
        return None
    return row_ids if len(row_ids) == shard["rows"] else None


def _usable_shards(directory: Path, part: dict, part_name: str) -> tuple[list[dict], set[int]]:
    """The shards of a writer's list whose files are intact, and the rows they hold."""
    kept, rows = [], set()
    for shard in part["shards"]:
        ids = _shard_row_ids(directory, shard)
        if ids is None:
            logger.warning("%s in %s lists %s, which is missing or damaged: its %d rows will be computed again",
                           part_name, directory, shard["file"], shard.get("rows", 0))
            continue
        kept.append(shard)
        rows.update(ids)
    return kept, rows


def _shard_name(writer: str, digests: torch.Tensor) -> str:
    """A shard's file name: the writer's name and a digest of the shard's row digests (ids and values)."""
    content = hashlib.blake2b(digests.contiguous().numpy().tobytes(), digest_size=8).hexdigest()
    return f"{SHARD_DIR}/{writer}-{content}.safetensors"


def _zero_block(vector: torch.Tensor, block_size: int) -> int | None:
    """The first block of ``block_size`` values of a row that is all zeros, ``None`` if there is none."""
    blocks = vector.reshape(-1, block_size)
    zero = ~(blocks != 0).any(dim=1)
    return int(zero.nonzero()[0, 0]) if bool(zero.any()) else None


class VectorStoreWriter:
    """Appends rows to a store under one writer name (one per process), resuming what is already there.

    Each writer lists its own shards in ``vectors/<name>.json``; :func:`merge_manifests` later combines every
    writer's list into ``manifest.json``. ``done`` holds the rows finished by any writer, earlier runs included.
    A shard listed there whose file is missing or damaged is ignored (its rows are computed again).

    :meth:`flush` either records a shard once or not at all, whatever exception interrupts it (``KeyboardInterrupt``
    included): calling it again after a failure writes the same rows under the same name, never twice.

    ``block_size`` (the sketch size K of a ``T * K`` row): rows with a block of ``block_size`` zeros (a timestep
    whose gradient is zero) are refused; ``None`` refuses only rows that are zero everywhere.
    """

    def __init__(
        self, directory: str | os.PathLike, row_dim: int, dtype: str, shard_size: int = DMinConfig.shard_size, name: str = "part-0",
        *, block_size: int | None = None,
    ):
        self.directory = Path(directory)
        (self.directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        if block_size is not None and (block_size < 1 or row_dim % block_size):
            raise ValueError(f"block_size {block_size} does not divide the row size {row_dim}")
        self.row_dim, self.dtype, self.shard_size, self.name = row_dim, dtype, shard_size, name
        self.block_size = block_size or row_dim
        self.done: set[int] = set()
        self.part: dict = {
            "format": "dmin-vectors", "version": STORE_VERSION, "row_dim": row_dim, "dtype": dtype, "shards": []
        }
        for leftover in (self.directory / SHARD_DIR).glob(f"{name}[-.]*{TEMPORARY_SUFFIX}"):
            _remove_quietly(leftover)  # this writer's own interrupted writes; other writers may be running
        for path in _part_manifests(self.directory):
            part = _read_part(path)
            if (part.get("row_dim"), part.get("dtype")) != (row_dim, dtype):
                raise ValueError(
                    f"the store in {self.directory} holds rows of {part.get('row_dim')} {part.get('dtype')} values, "
                    f"not {row_dim} {dtype}"
                )
            shards, rows = _usable_shards(self.directory, part, f"{SHARD_DIR}/{path.name}")
            self.done |= rows
            if path.stem == name:
                self.part = dict(part, shards=shards)
        self._pending_ids: list[int] = []
        self._pending_rows: list[torch.Tensor] = []

    def add(self, row_id: int, vector: torch.Tensor) -> None:
        """Queues one row; full shards are written at once."""
        row_id = int(row_id)
        if vector.numel() != self.row_dim:
            raise ValueError(f"row {row_id} has {vector.numel()} values, expected {self.row_dim}")
        if row_id in self.done or row_id in self._pending_ids:
            raise ValueError(f"row {row_id} is already stored in {self.directory}; a row is stored once")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError(
                f"row {row_id} has a NaN or infinite DMin vector (its image, caption or the model produced a "
                "non-finite gradient); it was not stored"
            )
        stored = vector.reshape(-1).to(_DTYPES[self.dtype])
        block = _zero_block(stored, self.block_size)
        if block is not None:
            where = f" at timestep {block}" if self.block_size < self.row_dim else ""
            raise ValueError(
                f"row {row_id} has an all-zero DMin vector{where}: the tracked parameters do not affect the model's "
                "output (a LoRA scale of 0, disabled or unloaded adapters, or frozen parameters); it was not stored"
            )
        self._pending_ids.append(row_id)
        self._pending_rows.append(stored)
        if len(self._pending_ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Writes queued rows as one shard and records it in this writer's manifest. Raises
        :class:`DiskFullError` when the disk is full (the rows recorded before are kept)."""
        if not self._pending_ids:
            return
        vectors = torch.stack(self._pending_rows).contiguous()
        row_ids = torch.tensor(self._pending_ids, dtype=torch.int64)
        digests = row_digests(row_ids, vectors)
        name = _shard_name(self.name, digests)
        if all(shard["file"] != name for shard in self.part["shards"]):
            path = self.directory / name
            kept = f"the {len(self.done)} rows stored before are kept"
            with disk_full_guard(self.directory, kept):
                save_tensors_atomic({"vectors": vectors, "row_ids": row_ids, "row_digests": digests}, path)
                record = {"file": name, "rows": len(row_ids), "sha256": file_sha256(path),
                          "bytes": path.stat().st_size, "row_digest": ROW_DIGEST}
                part = dict(self.part, shards=[*self.part["shards"], record])
                write_json_atomic(self.directory / SHARD_DIR / f"{self.name}.json", part)
            self.part = part  # one assignment: from here on, a retry finds the shard listed and writes nothing
        self.done.update(self._pending_ids)
        self._pending_ids, self._pending_rows = [], []


def _remove_leftovers(directory: Path, listed: set[str]) -> None:
    """Temporary files of interrupted writes, and shards that no writer's list holds (written, then interrupted
    before they were listed)."""
    for path in [*directory.glob(f"*{TEMPORARY_SUFFIX}"), *(directory / SHARD_DIR).glob(f"*{TEMPORARY_SUFFIX}")]:
        _remove_quietly(path)
    for path in (directory / SHARD_DIR).glob("*.safetensors"):
        if f"{SHARD_DIR}/{path.name}" not in listed:
            _remove_quietly(path)


def merge_manifests(directory: str | os.PathLike) -> dict:
    """Combines every writer's shard list into ``manifest.json``, shards ordered by their first row. Shards whose
    files are missing or damaged are left out (with a warning; the next build computes their rows again), and
    leftovers of interrupted writes are removed. Call it once every writer has finished."""
    directory = Path(directory)
    paths = _part_manifests(directory)
    if not paths:
        raise FileNotFoundError(f"no rows have been written to {directory}")
    parts, first_rows, seen = [], {}, set()
    for path in paths:
        part = _read_part(path)
        shards = []
        for shard in part["shards"]:
            ids = _shard_row_ids(directory, shard)
            if ids is None:
                logger.warning("%s is listed in %s but missing or damaged: left out of the index; build again to "
                               "compute its %d rows", shard["file"], path.name, shard.get("rows", 0))
                continue
            if seen & set(ids):
                raise IndexIntegrityError(
                    f"{shard['file']} in {directory} holds rows that another shard holds too; delete {SHARD_DIR}/ "
                    "and build again"
                )
            seen.update(ids)
            first_rows[shard["file"]] = ids[0] if ids else -1
            shards.append(shard)
        parts.append(dict(part, shards=shards))
    shards = sorted((shard for part in parts for shard in part["shards"]), key=lambda s: first_rows[s["file"]])
    manifest = {key: parts[0][key] for key in ("format", "row_dim", "dtype")} | {"version": STORE_VERSION,
                                                                                 "shards": shards}
    with disk_full_guard(directory, "the stored rows are kept"):
        written = write_manifest(directory, manifest)
    _remove_leftovers(directory, set(first_rows))
    return written


# ------------------------------------------------------------------------------------------------ reading


class VectorStore:
    """Read access to a store: streaming chunks for exact scoring, and random access to a few rows.

    Every row read is checked against its digest (``row_digests``; a streamed shard once per store object), or,
    for a shard without digests, the shard's sha256 against the manifest's the first time it is read; vectors
    holding NaN or infinite values, or a block of ``block_size`` zeros (a whole row when ``None``), are refused.
    Each names the row or file, so a damaged index is never ranked. ``verify=False`` skips these checks (for
    benchmarks that measure their cost).

    The store reads the files pinned when it was opened (``files``, see :func:`open_snapshot`; by default pinned
    here), so another process writing the directory meanwhile never changes what it reads. Safe to use from
    several threads.
    """

    def __init__(
        self, directory: str | os.PathLike, verify: bool = True, *, manifest: dict | None = None,
        files: PinnedFiles | None = None, block_size: int | None = None,
    ):
        self.directory = Path(directory)
        if files is None:
            manifest, files = open_snapshot(self.directory)
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {self.directory}")
        self.manifest = manifest
        self.files = files
        self.row_dim = int(manifest["row_dim"])
        self.block_size = block_size or self.row_dim
        self.shards = manifest["shards"]
        self.verify = verify
        self._lock = threading.Lock()
        self._unverified = set(range(len(self.shards))) if verify else set()
        self._has_digests: set[int] = set()
        self._digest_names: dict[int, str] = {}  # the row digest of each shard with digests
        self._digests: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # row digests, and which rows were checked
        ids, locations = [], []
        for shard_number, shard in enumerate(self.shards):
            if shard["file"] not in files:
                raise IndexIntegrityError(f"{shard['file']} is listed in {MANIFEST_NAME} but missing from "
                                          f"{self.directory}")
            with safe_open(self._path(shard), framework="pt") as handle:
                shard_ids = handle.get_tensor("row_ids").numpy()
                if "row_digests" in handle.keys():
                    self._has_digests.add(shard_number)
                    self._digest_names[shard_number] = row_digest_name(shard)
                elif "row_digest" in shard:
                    raise IndexIntegrityError(f"{shard['file']} holds no row digests, but {MANIFEST_NAME} lists "
                                              f"{shard['row_digest']!r} digests for it: the shard was replaced")
            files.check(shard["file"])
            ids.append(shard_ids)
            locations.append(np.stack([np.full(len(shard_ids), shard_number), np.arange(len(shard_ids))], axis=1))
        self.row_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        self._locations = np.concatenate(locations) if locations else np.zeros((0, 2), dtype=np.int64)
        # a sorted copy of the row ids for lookups: 16 bytes a row, where a dict would take about 100
        self._by_row = np.argsort(self.row_ids, kind="stable")
        self._sorted_ids = self.row_ids[self._by_row]

    def _path(self, shard: dict) -> str:
        return self.files.path(shard["file"])

    def _open_vectors(self, shard_number: int):
        """``safe_open`` of a shard; one without row digests has its sha256 checked first (on first use)."""
        shard = self.shards[shard_number]
        if shard_number in self._unverified and shard_number not in self._has_digests:
            check_file_digest(self._path(shard), shard, shard["file"], str(self.directory))
            self.files.check(shard["file"])
            with self._lock:
                self._unverified.discard(shard_number)
        return safe_open(self._path(shard), framework="pt")

    def _needs_row_check(self, shard_number: int) -> bool:
        return shard_number in self._unverified and shard_number in self._has_digests

    def _checked(self, raw: torch.Tensor, row_ids: torch.Tensor, stored_digests, shard_number: int) -> torch.Tensor:
        """Stored rows as float32, after checking them against their digests (``stored_digests``, or ``None`` when
        the shard needs no row check) and for non-finite and zero values."""
        shard = self.shards[shard_number]
        if stored_digests is not None:
            check_row_digests(row_ids, raw, stored_digests, shard["file"], self._digest_names[shard_number])
        return self._check_finite(raw.to(torch.float32), row_ids, shard)

    def _check_finite(self, vectors: torch.Tensor, row_ids, shard: dict) -> torch.Tensor:
        if not self.verify:
            return vectors
        # one pass: a block's norm is NaN or infinite when a value is, and 0 when every value is (a vectorised
        # norm costs a fraction of an element-wise isfinite over the same rows)
        norms = torch.linalg.vector_norm(vectors.reshape(len(vectors), -1, self.block_size), dim=2)
        finite = torch.isfinite(norms).all(dim=1)
        if not bool(finite.all()):
            bad = int(torch.as_tensor(row_ids)[~finite][0])
            raise IndexIntegrityError(
                f"row {bad} in {shard['file']} holds NaN or infinite values: the index is damaged or was built "
                "from a non-finite gradient; rebuild that row (delete the shard and resume the build)"
            )
        zero = (norms == 0).any(dim=1)
        if bool(zero.any()):
            bad = int(torch.as_tensor(row_ids)[zero][0])
            raise IndexIntegrityError(
                f"row {bad} in {shard['file']} is all zeros for a timestep: the index was built with tracked "
                "parameters that did not affect the output (a LoRA scale of 0, disabled adapters); rebuild it"
            )
        return vectors

    @property
    def num_rows(self) -> int:
        return len(self.row_ids)

    @property
    def nbytes(self) -> int:
        return sum(int(shard["bytes"]) for shard in self.shards)

    def iter_chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields ``(row_ids, float32 vectors)`` in chunks of at most ``chunk_rows`` rows, read from the
        memory-mapped shards without loading a whole shard."""
        for shard_number in range(len(self.shards)):
            name = self.shards[shard_number]["file"]
            with self._open_vectors(shard_number) as handle:
                row_ids = handle.get_tensor("row_ids")
                check = self._needs_row_check(shard_number)
                for start in range(0, len(row_ids), chunk_rows):
                    stop = min(start + chunk_rows, len(row_ids))
                    stored = handle.get_slice("row_digests")[start:stop] if check else None
                    raw = handle.get_slice("vectors")[start:stop]
                    self.files.check(name)
                    yield row_ids[start:stop], self._checked(raw, row_ids[start:stop], stored, shard_number)
            with self._lock:
                self._unverified.discard(shard_number)  # every row of it has been checked

    def get_rows(self, row_ids: list[int]) -> torch.Tensor:
        """The float32 vectors of the given dataset rows, in the given order."""
        out = torch.empty((len(row_ids), self.row_dim), dtype=torch.float32)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for out_index, row in enumerate(row_ids):
            found = int(np.searchsorted(self._sorted_ids, int(row)))
            if found == len(self._sorted_ids) or self._sorted_ids[found] != int(row):
                raise KeyError(f"row {row} is not in the store")
            shard_number, offset = self._locations[self._by_row[found]]
            by_shard.setdefault(int(shard_number), []).append((out_index, int(offset)))
        for shard_number, wanted in by_shard.items():
            positions = [out_index for out_index, _ in wanted]
            offsets = [offset for _, offset in wanted]
            name = self.shards[shard_number]["file"]
            with self._open_vectors(shard_number) as handle:
                vectors = handle.get_slice("vectors")
                raw = torch.cat([vectors[offset : offset + 1] for offset in offsets])
                ids = torch.tensor([int(row_ids[i]) for i in positions], dtype=torch.int64)
                if self._needs_row_check(shard_number):
                    with self._lock:  # 8 bytes and a flag a row, kept once read
                        if shard_number not in self._digests:
                            digests = handle.get_tensor("row_digests")
                            self._digests[shard_number] = (digests, np.zeros(len(digests), dtype=bool))
                        digests, checked = self._digests[shard_number]
                        fresh = [i for i, offset in enumerate(offsets) if not checked[offset]]
                    if fresh:
                        check_row_digests(ids[fresh], raw[fresh], digests[[offsets[i] for i in fresh]], name,
                                          self._digest_names[shard_number])
                        with self._lock:
                            checked[[offsets[i] for i in fresh]] = True
            self.files.check(name)
            out[positions] = self._check_finite(raw.to(torch.float32), ids, self.shards[shard_number])
        return out

"""On-disk rows: safetensors shards listed in a JSON manifest.

A shard holds ``vectors`` (rows x row_dim, in the storage dtype) and ``row_ids`` (int64 dataset row numbers).
Shards and manifests are written to a temporary name and renamed, and a shard only counts once a manifest
lists it, so a process killed at any moment leaves a consistent store that can be resumed.

A shard also holds ``row_digests``: for each row, 8 bytes of blake2b over its row id and its stored values, so a
reader can check exactly the rows it reads (a query reads a few dozen of millions) instead of hashing whole files.

The manifest lists the sha256 and size of every shard and, under ``"files"``, of the other files of an index;
:func:`verify_files` and :func:`check_shard_layout` check them before anything is read, and :class:`VectorStore`
checks every row it reads against its digest (a shard written before digests existed: the shard's sha256, the
first time it is read) and refuses non-finite values.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import STORAGE_DTYPES

MANIFEST_NAME = "manifest.json"
SHARD_DIR = "vectors"
ROW_DIGEST_BYTES = 8
STORE_VERSION = 2  # 2: shards carry row digests and the manifest a checksum of itself
_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPES}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


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


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a store, ``None`` if there is none; raises :class:`IndexIntegrityError` when it is not
    valid JSON or does not match its own checksum (manifests written before the checksum existed have none)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
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


# ------------------------------------------------------------------------------------------------ checksums


class IndexIntegrityError(ValueError):
    """A file of an index is missing, truncated, or not the file that ``manifest.json`` lists."""


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


def check_file_digest(path: Path, record: dict, name: str) -> None:
    """Raises :class:`IndexIntegrityError` when the file's sha256 is not the one ``record`` lists."""
    digest = file_sha256(path)
    if digest != record["sha256"]:
        raise IndexIntegrityError(
            f"{name} does not match its checksum in {MANIFEST_NAME} (sha256 {digest[:16]}..., expected "
            f"{record['sha256'][:16]}...): the file was modified or damaged (in {path.parent})"
        )


def verify_files(
    directory: str | os.PathLike, manifest: dict, full: bool | Collection[str] = True, optional: tuple[str, ...] = ()
) -> None:
    """Checks every file the manifest lists: present (unless in ``optional``), of the listed size and, for the
    files in ``full`` (every file when ``True``), of the listed sha256. Raises :class:`IndexIntegrityError`
    naming the first bad file."""
    directory = Path(directory)
    for name, record in manifest_entries(manifest).items():
        path = directory / name
        if not path.is_file():
            if name in optional:
                continue
            raise IndexIntegrityError(f"{name} is listed in {MANIFEST_NAME} but missing from {directory}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise IndexIntegrityError(
                f"{name} has {size} bytes but {MANIFEST_NAME} lists {record['bytes']}: the file is truncated or "
                f"was replaced (in {directory})"
            )
        if full is True or (full and name in full):
            check_file_digest(path, record, name)


def row_digests(row_ids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``(rows, 8)`` uint8: blake2b of each row's id (int64, little-endian) and its values as stored."""
    raw = vectors.contiguous().view(torch.uint8).numpy()
    ids = row_ids.numpy().astype("<i8")
    out = np.empty((len(ids), ROW_DIGEST_BYTES), dtype=np.uint8)
    for i in range(len(ids)):
        digest = hashlib.blake2b(ids[i : i + 1].tobytes(), digest_size=ROW_DIGEST_BYTES)
        digest.update(raw[i])
        out[i] = np.frombuffer(digest.digest(), dtype=np.uint8)
    return torch.from_numpy(out)


def check_row_digests(row_ids: torch.Tensor, vectors: torch.Tensor, stored: torch.Tensor, name: str) -> None:
    """Raises :class:`IndexIntegrityError` naming the first row whose values or id do not match its digest."""
    bad = (row_digests(row_ids, vectors) != stored).any(dim=1)
    if bool(bad.any()):
        row = int(row_ids[bad][0])
        raise IndexIntegrityError(
            f"row {row} in {name} does not match its checksum: the shard was modified or damaged"
        )


def check_shard_layout(directory: str | os.PathLike, shard: dict, row_dim: int, dtype: str) -> None:
    """Checks a shard's safetensors header against the manifest: ``vectors`` of ``(rows, row_dim)`` values in the
    storage dtype, ``row_ids`` of ``rows`` int64 values and, if present (shards written since version 0.2),
    ``row_digests`` of ``(rows, 8)`` uint8. safetensors validates the header itself."""
    name = shard["file"]
    expected = {"vectors": (str(_DTYPES[dtype]), [shard["rows"], row_dim]), "row_ids": ("torch.int64", [shard["rows"]])}
    try:
        with safe_open(Path(directory) / name, framework="pt") as handle:
            found = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                dtype = piece.get_dtype()
                found[key] = (str(_SAFETENSORS_DTYPES.get(dtype, dtype)), list(piece.get_shape()))
    except Exception as error:  # safetensors raises its own error types for malformed headers
        raise IndexIntegrityError(f"{name} is not a readable safetensors file ({error})") from None
    if "row_digests" in found:
        expected["row_digests"] = ("torch.uint8", [shard["rows"], ROW_DIGEST_BYTES])
    if found != expected:
        raise IndexIntegrityError(f"{name} holds {found}, but {MANIFEST_NAME} implies {expected}")


_SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64, "U8": torch.uint8
}


def _part_manifests(directory: Path) -> list[Path]:
    return sorted((directory / SHARD_DIR).glob("*.json"))


def _rows_in(directory: Path, shards: list[dict]) -> set[int]:
    done: set[int] = set()
    for shard in shards:
        with safe_open(directory / shard["file"], framework="pt") as handle:
            done.update(handle.get_tensor("row_ids").tolist())
    return done


class VectorStoreWriter:
    """Appends rows to a store under one writer name (one per process), resuming what is already there.

    Each writer lists its own shards in ``vectors/<name>.json``; :func:`merge_manifests` later combines every
    writer's list into ``manifest.json``. ``done`` holds the rows finished by any writer, earlier runs included.
    """

    def __init__(
        self, directory: str | os.PathLike, row_dim: int, dtype: str, shard_size: int = 1024, name: str = "part-0"
    ):
        self.directory = Path(directory)
        (self.directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self.row_dim, self.dtype, self.shard_size, self.name = row_dim, dtype, shard_size, name
        self.done: set[int] = set()
        self.part: dict = {
            "format": "dmin-vectors", "version": STORE_VERSION, "row_dim": row_dim, "dtype": dtype, "shards": []
        }
        for path in _part_manifests(self.directory):
            part = json.loads(path.read_text())
            if (part["row_dim"], part["dtype"]) != (row_dim, dtype):
                raise ValueError(
                    f"the store in {self.directory} holds rows of {part['row_dim']} {part['dtype']} values, "
                    f"not {row_dim} {dtype}"
                )
            self.done |= _rows_in(self.directory, part["shards"])
            if path.stem == name:
                self.part = part
        self._pending_ids: list[int] = []
        self._pending_rows: list[torch.Tensor] = []

    def add(self, row_id: int, vector: torch.Tensor) -> None:
        """Queues one row; full shards are written at once."""
        if vector.numel() != self.row_dim:
            raise ValueError(f"row {row_id} has {vector.numel()} values, expected {self.row_dim}")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError(
                f"row {row_id} has a NaN or infinite DMin vector (its image, caption or the model produced a "
                "non-finite gradient); it was not stored"
            )
        self._pending_ids.append(int(row_id))
        self._pending_rows.append(vector.reshape(-1).to(_DTYPES[self.dtype]))
        if len(self._pending_ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Writes queued rows as one shard and records it in this writer's manifest."""
        if not self._pending_ids:
            return
        name = f"{SHARD_DIR}/{self.name}-{len(self.part['shards']):05d}.safetensors"
        path = self.directory / name
        vectors = torch.stack(self._pending_rows).contiguous()
        row_ids = torch.tensor(self._pending_ids, dtype=torch.int64)
        tensors = {"vectors": vectors, "row_ids": row_ids, "row_digests": row_digests(row_ids, vectors)}
        save_file(tensors, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        self.part["shards"].append(
            {"file": name, "rows": len(self._pending_ids), "sha256": file_sha256(path), "bytes": path.stat().st_size}
        )
        write_json_atomic(self.directory / SHARD_DIR / f"{self.name}.json", self.part)
        self.done.update(self._pending_ids)
        self._pending_ids, self._pending_rows = [], []


def merge_manifests(directory: str | os.PathLike) -> dict:
    """Combines every writer's shard list into ``manifest.json``, shards ordered by their first row."""
    directory = Path(directory)
    parts = [json.loads(path.read_text()) for path in _part_manifests(directory)]
    if not parts:
        raise FileNotFoundError(f"no rows have been written to {directory}")
    first_rows = {}
    for part in parts:
        for shard in part["shards"]:
            with safe_open(directory / shard["file"], framework="pt") as handle:
                first_rows[shard["file"]] = int(handle.get_slice("row_ids")[0:1][0])
    shards = sorted((shard for part in parts for shard in part["shards"]), key=lambda s: first_rows[s["file"]])
    manifest = {key: parts[0][key] for key in ("format", "row_dim", "dtype")} | {"version": STORE_VERSION,
                                                                                 "shards": shards}
    return write_manifest(directory, manifest)


class VectorStore:
    """Read access to a store: streaming chunks for exact scoring, and random access to a few rows.

    Every row read is checked against its digest (``row_digests``; a streamed shard once per store object), or,
    for a shard without digests, the shard's sha256 against the manifest's the first time it is read; vectors
    holding NaN or infinite values are refused. Each names the row or file, so a damaged index is never ranked.
    ``verify=False`` skips these checks (for benchmarks that measure their cost)."""

    def __init__(self, directory: str | os.PathLike, verify: bool = True):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {self.directory}")
        self.manifest = manifest
        self.row_dim = int(manifest["row_dim"])
        self.shards = manifest["shards"]
        self.verify = verify
        self._unverified = set(range(len(self.shards))) if verify else set()
        self._has_digests: set[int] = set()
        self._digests: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # row digests, and which rows were checked
        ids, locations = [], []
        for shard_number, shard in enumerate(self.shards):
            with safe_open(self._path(shard), framework="pt") as handle:
                shard_ids = handle.get_tensor("row_ids").numpy()
                if "row_digests" in handle.keys():
                    self._has_digests.add(shard_number)
            ids.append(shard_ids)
            locations.append(np.stack([np.full(len(shard_ids), shard_number), np.arange(len(shard_ids))], axis=1))
        self.row_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        self._locations = np.concatenate(locations) if locations else np.zeros((0, 2), dtype=np.int64)
        # a sorted copy of the row ids for lookups: 16 bytes a row, where a dict would take about 100
        self._by_row = np.argsort(self.row_ids, kind="stable")
        self._sorted_ids = self.row_ids[self._by_row]

    def _path(self, shard: dict) -> Path:
        return self.directory / shard["file"]

    def _open_vectors(self, shard_number: int):
        """``safe_open`` of a shard; one without row digests has its sha256 checked first (on first use)."""
        shard = self.shards[shard_number]
        if shard_number in self._unverified and shard_number not in self._has_digests:
            check_file_digest(self._path(shard), shard, shard["file"])
            self._unverified.discard(shard_number)
        return safe_open(self._path(shard), framework="pt")

    def _needs_row_check(self, shard_number: int) -> bool:
        return shard_number in self._unverified and shard_number in self._has_digests

    def _checked(self, raw: torch.Tensor, row_ids: torch.Tensor, stored_digests, shard_number: int) -> torch.Tensor:
        """Stored rows as float32, after checking them against their digests (``stored_digests``, or ``None`` when
        the shard needs no row check) and for non-finite values."""
        shard = self.shards[shard_number]
        if stored_digests is not None:
            check_row_digests(row_ids, raw, stored_digests, shard["file"])
        return self._check_finite(raw.to(torch.float32), row_ids, shard)

    def _check_finite(self, vectors: torch.Tensor, row_ids, shard: dict) -> torch.Tensor:
        if not self.verify:
            return vectors
        finite = torch.isfinite(vectors).all(dim=1)
        if not bool(finite.all()):
            bad = int(torch.as_tensor(row_ids)[~finite][0])
            raise IndexIntegrityError(
                f"row {bad} in {shard['file']} holds NaN or infinite values: the index is damaged or was built "
                "from a non-finite gradient; rebuild that row (delete the shard and resume the build)"
            )
        return vectors

    @property
    def num_rows(self) -> int:
        return len(self.row_ids)

    @property
    def nbytes(self) -> int:
        return sum(int(shard["bytes"]) for shard in self.shards)

    def iter_chunks(self, chunk_rows: int = 8192) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields ``(row_ids, float32 vectors)`` in chunks of at most ``chunk_rows`` rows, read from the
        memory-mapped shards without loading a whole shard."""
        for shard_number in range(len(self.shards)):
            with self._open_vectors(shard_number) as handle:
                row_ids = handle.get_tensor("row_ids")
                check = self._needs_row_check(shard_number)
                for start in range(0, len(row_ids), chunk_rows):
                    stop = min(start + chunk_rows, len(row_ids))
                    stored = handle.get_slice("row_digests")[start:stop] if check else None
                    raw = handle.get_slice("vectors")[start:stop]
                    yield row_ids[start:stop], self._checked(raw, row_ids[start:stop], stored, shard_number)
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
            with self._open_vectors(shard_number) as handle:
                vectors = handle.get_slice("vectors")
                raw = torch.cat([vectors[offset : offset + 1] for offset in offsets])
                ids = torch.tensor([int(row_ids[i]) for i in positions], dtype=torch.int64)
                if self._needs_row_check(shard_number):
                    if shard_number not in self._digests:  # 8 bytes and a flag a row, kept once read
                        digests = handle.get_tensor("row_digests")
                        self._digests[shard_number] = (digests, np.zeros(len(digests), dtype=bool))
                    digests, checked = self._digests[shard_number]
                    fresh = [i for i, offset in enumerate(offsets) if not checked[offset]]
                    if fresh:
                        check_row_digests(ids[fresh], raw[fresh], digests[[offsets[i] for i in fresh]],
                                          self.shards[shard_number]["file"])
                        checked[[offsets[i] for i in fresh]] = True
            out[positions] = self._check_finite(raw.to(torch.float32), ids, self.shards[shard_number])
        return out

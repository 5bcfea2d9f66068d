"""The row store: writers per process, merged manifest, random access and streaming in any order."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dmin_diffusers.store import (
    IndexIntegrityError,
    VectorStore,
    VectorStoreWriter,
    file_sha256,
    merge_manifests,
    write_manifest,
)


def test_two_writers_merge_and_rows_come_back_in_the_asked_order(tmp_path):
    rows = {row: torch.full((6,), row + 0.5) for row in range(7)}
    first = VectorStoreWriter(tmp_path, 6, "float32", shard_size=2, name="part-000-of-002")
    second = VectorStoreWriter(tmp_path, 6, "float32", shard_size=2, name="part-001-of-002")
    for row in (4, 5, 6):
        second.add(row, rows[row])
    for row in (0, 1, 2, 3):
        first.add(row, rows[row])
    first.flush()
    second.flush()
    merge_manifests(tmp_path)
    store = VectorStore(tmp_path)
    assert store.num_rows == 7
    wanted = [6, 0, 3, 5, 1]
    assert store.get_rows(wanted)[:, 0].tolist() == [row + 0.5 for row in wanted]
    streamed = torch.cat([ids for ids, _ in store.iter_chunks(chunk_rows=1)])
    assert streamed.tolist() == list(range(7))  # shards ordered by their first row
    with pytest.raises(KeyError, match="row 9"):
        store.get_rows([9])
    assert VectorStoreWriter(tmp_path, 6, "float32", name="part-000-of-001").done == set(range(7))


def test_a_store_of_another_row_size_is_refused(tmp_path):
    writer = VectorStoreWriter(tmp_path, 6, "float32", shard_size=1)
    writer.add(0, torch.ones(6))
    with pytest.raises(ValueError, match="holds rows of 6 float32 values, not 8 float32"):
        VectorStoreWriter(tmp_path, 8, "float32")
    with pytest.raises(ValueError, match="has 5 values, expected 6"):
        writer.add(1, torch.ones(5))


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def one_shard(directory, rows: int, dtype: str) -> dict:
    """A merged store of ``rows`` rows of 4 values (row r holds r + 1) in one shard; returns the manifest."""
    writer = VectorStoreWriter(directory, 4, dtype, shard_size=4)
    for row in range(rows):
        writer.add(row, torch.full((4,), row + 1.0))
    writer.flush()
    return merge_manifests(directory)


def test_every_read_row_is_checked_against_its_digest(tmp_path):
    manifest = one_shard(tmp_path, 4, "float16")
    path = tmp_path / manifest["shards"][0]["file"]
    with safe_open(path, framework="pt") as handle:
        assert handle.get_tensor("row_digests").shape == (4, 8)
    # the last bytes of the file are row 3's values (safetensors lays tensors out by dtype size, vectors last)
    flip(path, path.stat().st_size - 1)
    store = VectorStore(tmp_path)
    assert store.get_rows([0, 1])[:, 0].tolist() == [1.0, 2.0]  # only the rows read are checked
    message = rf"row 3 in {manifest['shards'][0]['file']} does not match its checksum"
    with pytest.raises(IndexIntegrityError, match=message):
        store.get_rows([3])
    with pytest.raises(IndexIntegrityError, match="row 3 .* does not match its checksum"):
        list(VectorStore(tmp_path).iter_chunks())
    assert VectorStore(tmp_path, verify=False).get_rows([3]).shape == (1, 4)  # the benchmarks' unchecked baseline


def test_a_shard_without_row_digests_is_checked_whole(tmp_path):
    """Shards written before row digests existed: their sha256 in the manifest is checked on first read."""
    manifest = one_shard(tmp_path, 3, "float32")
    shard = manifest["shards"][0]
    path = tmp_path / shard["file"]
    with safe_open(path, framework="pt") as handle:
        old = {key: handle.get_tensor(key) for key in ("vectors", "row_ids")}
    save_file(old, path)
    shard.update(sha256=file_sha256(path), bytes=path.stat().st_size)
    write_manifest(tmp_path, manifest)
    assert VectorStore(tmp_path).get_rows([2])[0, 0] == 3.0
    flip(path, path.stat().st_size - 1)
    with pytest.raises(IndexIntegrityError, match="does not match its checksum in manifest.json"):
        VectorStore(tmp_path).get_rows([0])

"""The row store: writers per process, merged manifest, random access and streaming in any order."""

import hashlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dmin_diffusers.store import (
    LEGACY_ROW_DIGEST,
    ROW_DIGEST,
    IndexIntegrityError,
    VectorStore,
    VectorStoreWriter,
    check_shard_layout,
    file_sha256,
    merge_manifests,
    row_digests,
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
    del shard["row_digest"]  # entries of that time named no row digest
    write_manifest(tmp_path, manifest)
    assert VectorStore(tmp_path).get_rows([2])[0, 0] == 3.0
    flip(path, path.stat().st_size - 1)
    with pytest.raises(IndexIntegrityError, match="does not match its checksum in manifest.json"):
        VectorStore(tmp_path).get_rows([0])


PINNED_LINEAR_DIGEST = "efd2fc85fc4909b5"  # (3 k_0 + sum k_i w_i) mod 2**64 over 32-bit words; keys from shake-256


def rewrite_shard(directory, manifest: dict, tensors: dict, **entry) -> None:
    """Replaces the manifest's only shard with ``tensors`` and lists its new sha256 and size (so that only the row
    digests can tell what changed); ``entry``: fields of the shard's entry to set (``None`` removes one)."""
    shard = manifest["shards"][0]
    path = directory / shard["file"]
    save_file(tensors, path)
    shard.update(sha256=file_sha256(path), bytes=path.stat().st_size)
    for key, value in entry.items():
        if value is None:
            shard.pop(key, None)
        else:
            shard[key] = value
    write_manifest(directory, manifest)


def shard_tensors(directory, manifest: dict) -> dict:
    with safe_open(directory / manifest["shards"][0]["file"], framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.parametrize("dtype, row_dim", [("float16", 4), ("float16", 7), ("bfloat16", 12), ("float32", 3)])
def test_the_linear_row_digest_changes_with_every_bit_of_a_row_and_its_id(dtype, row_dim):
    """Any single flipped bit of the stored values (rows that are not a whole number of 64-bit words are padded),
    and any other row id, gives another digest; the digest of a row does not depend on the chunk it is read in."""
    rows = torch.randn(5, row_dim).to(getattr(torch, dtype))
    ids = torch.arange(10, 15, dtype=torch.int64)
    digests = row_digests(ids, rows)
    assert digests.dtype == torch.uint8 and digests.shape == (5, 8)
    assert torch.equal(row_digests(ids[2:3], rows[2:3]), digests[2:3])
    raw = rows.view(torch.uint8).numpy()
    for byte in range(raw.shape[1]):
        for bit in range(8):
            changed = raw.copy()
            changed[1, byte] ^= 1 << bit
            damaged = torch.from_numpy(changed).view(rows.dtype)
            assert not torch.equal(row_digests(ids, damaged)[1], digests[1]), (byte, bit)
            assert torch.equal(row_digests(ids, damaged)[[0, 2, 3, 4]], digests[[0, 2, 3, 4]])
    for other in (11, -1, 2**40, 2**63 - 1):
        assert not torch.equal(row_digests(torch.tensor([other]), rows[:1]), digests[:1])


def test_the_linear_row_digest_changes_with_any_two_flipped_bits_and_not_with_the_block_size(monkeypatch):
    """Every pair of flipped bits of a 16-byte row (the sign bits of two words included, which cancel in a sum of
    64-bit words) changes the digest; digests computed in blocks of 3 words equal the default's."""
    row = (torch.arange(8, dtype=torch.float16) / 8 - 0.4).reshape(1, 8)
    raw = np.unpackbits(row.view(torch.uint8).numpy(), axis=1)[0]
    pairs = [(a, b) for a in range(raw.size) for b in range(a + 1, raw.size)]
    damaged = np.repeat(raw[None], len(pairs), axis=0)
    for index, (a, b) in enumerate(pairs):
        damaged[index, [a, b]] ^= 1
    damaged = torch.from_numpy(np.packbits(damaged, axis=1)).view(torch.float16)
    ids = torch.zeros(len(pairs), dtype=torch.int64)
    digest = row_digests(ids[:1], row)
    digests = row_digests(ids, damaged)
    assert not (digests == digest).all(dim=1).any()
    monkeypatch.setattr("dmin_diffusers.store._DIGEST_BLOCK_ROWS", 3)
    assert torch.equal(row_digests(ids, damaged), digests)


def test_the_linear_row_digest_is_the_same_on_every_machine():
    """Keys come from a constant string, not from a random state: a pinned value guards the format."""
    row = torch.arange(8, dtype=torch.float16).reshape(1, 8) / 8
    assert row_digests(torch.tensor([3]), row).numpy().tobytes().hex() == PINNED_LINEAR_DIGEST


def test_new_shards_name_their_digest_and_a_changed_value_or_row_id_is_detected(tmp_path):
    manifest = one_shard(tmp_path, 4, "float16")
    assert manifest["shards"][0]["row_digest"] == ROW_DIGEST == "linear64-v1"
    tensors = shard_tensors(tmp_path, manifest)
    assert torch.equal(tensors["row_digests"], row_digests(tensors["row_ids"], tensors["vectors"]))
    values = tensors["vectors"].clone()
    values[1, 2] = 2.001953125  # the next float16 after row 1's 2.0: one changed bit
    rewrite_shard(tmp_path, manifest, dict(tensors, vectors=values))
    check_shard_layout(tmp_path, manifest["shards"][0], 4, "float16")
    store = VectorStore(tmp_path)
    assert store.get_rows([0, 2, 3])[:, 0].tolist() == [1.0, 3.0, 4.0]
    with pytest.raises(IndexIntegrityError, match="row 1 in .* does not match its checksum"):
        store.get_rows([1])
    with pytest.raises(IndexIntegrityError, match="row 1 in .* does not match its checksum"):
        list(VectorStore(tmp_path).iter_chunks())
    row_ids = tensors["row_ids"].clone()
    row_ids[2] = 9  # row 2's values under another id
    rewrite_shard(tmp_path, manifest, dict(tensors, row_ids=row_ids))
    with pytest.raises(IndexIntegrityError, match="row 9 in .* does not match its checksum"):
        list(VectorStore(tmp_path).iter_chunks(chunk_rows=3))
    with pytest.raises(IndexIntegrityError, match="row 9 in .* does not match its checksum"):
        VectorStore(tmp_path).get_rows([9])


def test_a_store_written_with_blake2b_row_digests_still_opens_and_verifies(tmp_path):
    """Shards written before ``linear64-v1`` (blake2b-64 of the id and values, no ``row_digest`` in the entry) are
    checked with blake2b: old indices keep loading, and a damaged one is still refused."""
    manifest = one_shard(tmp_path, 4, "float16")
    tensors = shard_tensors(tmp_path, manifest)
    raw = tensors["vectors"].view(torch.uint8).numpy()
    old = np.stack([np.frombuffer(hashlib.blake2b(np.int64(row).tobytes() + raw[row].tobytes(), digest_size=8)
                                  .digest(), dtype=np.uint8) for row in range(4)])  # as version 0.2 wrote them
    assert torch.equal(row_digests(tensors["row_ids"], tensors["vectors"], LEGACY_ROW_DIGEST), torch.from_numpy(old))
    rewrite_shard(tmp_path, manifest, dict(tensors, row_digests=torch.from_numpy(old)), row_digest=None)
    assert "row_digest" not in manifest["shards"][0]
    check_shard_layout(tmp_path, manifest["shards"][0], 4, "float16")
    store = VectorStore(tmp_path)
    assert store.get_rows([3, 0])[:, 0].tolist() == [4.0, 1.0]
    assert [ids.tolist() for ids, _ in store.iter_chunks(chunk_rows=3)] == [[0, 1, 2], [3]]
    assert VectorStoreWriter(tmp_path, 4, "float16", name="part-1").done == {0, 1, 2, 3}  # resumable as before
    path = tmp_path / manifest["shards"][0]["file"]
    flip(path, path.stat().st_size - 1)  # row 3's last value; the manifest's sha256 is left stale
    with pytest.raises(IndexIntegrityError, match="row 3 in .* does not match its checksum"):
        VectorStore(tmp_path).get_rows([3])
    values = tensors["vectors"].clone()
    values[0, 0] = -values[0, 0]
    rewrite_shard(tmp_path, manifest, dict(tensors, vectors=values, row_digests=torch.from_numpy(old)))
    with pytest.raises(IndexIntegrityError, match="row 0 in .* does not match its checksum"):
        list(VectorStore(tmp_path).iter_chunks())


def test_an_unknown_row_digest_or_missing_digests_are_refused(tmp_path):
    manifest = one_shard(tmp_path, 2, "float32")
    tensors = shard_tensors(tmp_path, manifest)
    rewrite_shard(tmp_path, manifest, tensors, row_digest="linear128-v9")
    with pytest.raises(IndexIntegrityError, match="row digest 'linear128-v9', which this version .* does not know"):
        VectorStore(tmp_path)
    with pytest.raises(IndexIntegrityError, match="'linear128-v9'"):
        check_shard_layout(tmp_path, manifest["shards"][0], 4, "float32")
    without = {key: tensors[key] for key in ("vectors", "row_ids")}
    rewrite_shard(tmp_path, manifest, without, row_digest=ROW_DIGEST)  # an entry naming digests the shard lacks
    with pytest.raises(IndexIntegrityError, match="holds no row digests"):
        VectorStore(tmp_path)
    with pytest.raises(IndexIntegrityError, match="manifest.json implies"):
        check_shard_layout(tmp_path, manifest["shards"][0], 4, "float32")

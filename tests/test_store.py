"""The row store: writers per process, merged manifest, random access and streaming in any order."""

import pytest
import torch

from dmin_diffusers.store import VectorStore, VectorStoreWriter, merge_manifests


def test_two_writers_merge_and_rows_come_back_in_the_asked_order(tmp_path):
    rows = {row: torch.full((6,), float(row)) for row in range(7)}
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
    assert store.get_rows(wanted)[:, 0].tolist() == [float(row) for row in wanted]
    streamed = torch.cat([ids for ids, _ in store.iter_chunks(chunk_rows=1)])
    assert streamed.tolist() == list(range(7))  # shards ordered by their first row
    with pytest.raises(KeyError, match="row 9"):
        store.get_rows([9])
    assert VectorStoreWriter(tmp_path, 6, "float32", name="part-000-of-001").done == set(range(7))


def test_a_store_of_another_row_size_is_refused(tmp_path):
    writer = VectorStoreWriter(tmp_path, 6, "float32", shard_size=1)
    writer.add(0, torch.zeros(6))
    with pytest.raises(ValueError, match="holds rows of 6 float32 values, not 8 float32"):
        VectorStoreWriter(tmp_path, 8, "float32")
    with pytest.raises(ValueError, match="has 5 values, expected 6"):
        writer.add(1, torch.zeros(5))

"""The public HNSW functions (``dmin_diffusers.hnsw``) that the benchmarks build their graphs with: the graph of the
index's own build, and its query rule."""

import numpy as np
import pytest
import torch

from dmin_diffusers.hnsw import build_hnsw, query_hnsw, search_ef
from dmin_diffusers.knn_file import check_knn_file
from dmin_diffusers.search import KnnIndex
from dmin_diffusers.store import VectorStore, VectorStoreWriter, merge_manifests

T, K, KNN_DIM = 2, 16, 4
NUM_ROWS = 300


@pytest.fixture(scope="module")
def rows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(NUM_ROWS, T, K, generator=generator), dim=-1)


@pytest.fixture(scope="module")
def store(rows, tmp_path_factory) -> VectorStore:
    directory = tmp_path_factory.mktemp("store")
    writer = VectorStoreWriter(directory, T * K, "float32", shard_size=128)
    for row_id, row in enumerate(rows):
        writer.add(row_id, row.reshape(-1))
    writer.flush()
    merge_manifests(directory)
    return VectorStore(directory)


def saved(index, path) -> bytes:
    index.save_index(str(path))
    return path.read_bytes()


def test_the_graph_is_the_one_the_index_builds(store, tmp_path):
    """One thread: byte for byte the graph of ``KnnIndex.build`` over the same rows (folded vectors), whether the
    vectors come in one piece or streamed in chunks; and a file ``check_knn_file`` accepts for the defaults."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        knn = KnnIndex.build(store, T, KNN_DIM, chunk_rows=128)
    finally:
        torch.set_num_threads(threads)
    ids = store.row_ids
    vectors = knn.row_vectors(store.get_rows(ids.tolist()), torch.as_tensor(ids))
    whole = build_hnsw([(ids, vectors)], T * KNN_DIM, NUM_ROWS, num_threads=1)
    streamed = build_hnsw(((ids[s : s + 100], vectors[s : s + 100]) for s in range(0, NUM_ROWS, 100)), T * KNN_DIM,
                          NUM_ROWS, num_threads=1)
    expected = saved(knn.index, tmp_path / "index.bin")
    assert saved(whole, tmp_path / "whole.bin") == expected
    assert saved(streamed, tmp_path / "streamed.bin") == expected
    assert (whole.space, whole.M, whole.ef_construction) == ("ip", 32, 200)
    check_knn_file(tmp_path / "whole.bin", T * KNN_DIM, ids, m=32, ef_construction=200)


def test_queries_follow_the_index_rule(store):
    knn = KnnIndex.build(store, T, KNN_DIM)
    queries = knn.row_vectors(store.get_rows([3, 7]), torch.tensor([3, 7]))
    labels = query_hnsw(knn.index, queries, 10)
    assert labels.dtype == np.int64 and labels.shape == (2, 10)
    assert knn.index.ef == search_ef(10) == 100
    assert labels[0].tolist() == knn.candidates(store.get_rows([3])[0], 10)
    query_hnsw(knn.index, queries, 10, ef=500)
    assert knn.index.ef == 500
    assert query_hnsw(knn.index, queries, 50).shape == (2, 50) and knn.index.ef == search_ef(50) == 500


def test_counts_are_clamped_to_the_index(store):
    small = build_hnsw([(np.arange(5), np.eye(5, dtype=np.float32))], 5, 5, m=4, ef_construction=10)
    assert query_hnsw(small, np.eye(5, dtype=np.float32)[:1], 40).shape == (1, 5)
    assert query_hnsw(small, np.eye(5, dtype=np.float32)[:2], 0).shape == (2, 0)
    empty = build_hnsw([], 5, 0)
    assert empty.max_elements == 1 and query_hnsw(empty, np.eye(5, dtype=np.float32)[:1], 3).shape == (1, 0)

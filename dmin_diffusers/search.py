"""Exact scoring over the stored rows, and the HNSW index (hnswlib, inner product) built from them."""

from __future__ import annotations

import os
from pathlib import Path

import hnswlib
import numpy as np
import torch

from .sketch import fold_sketch
from .store import VectorStore


def exact_top_k(store: VectorStore, query: torch.Tensor, top_k: int, chunk_rows: int = 8192):
    """Inner products of ``query`` (``row_dim`` values) with every stored row, streamed in chunks.

    Returns ``(row_ids, scores)``: the ``min(top_k, rows)`` best rows, highest score first.
    """
    query = query.reshape(-1).to(torch.float32)
    best_ids = torch.zeros(0, dtype=torch.int64)
    best_scores = torch.zeros(0, dtype=torch.float32)
    for row_ids, vectors in store.iter_chunks(chunk_rows):
        scores = torch.cat([best_scores, vectors @ query])
        ids = torch.cat([best_ids, row_ids])
        keep = torch.topk(scores, min(top_k, len(scores))).indices
        best_ids, best_scores = ids[keep], scores[keep]
    order = _stable_descending(best_scores, best_ids)
    return best_ids[order].tolist(), best_scores[order].tolist()


def _stable_descending(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sort by score, highest first, ties broken by the lower row id (so results are reproducible)."""
    by_id = torch.argsort(ids)
    by_score = torch.argsort(scores[by_id], descending=True, stable=True)
    return by_id[by_score]


def knn_vectors(vectors: torch.Tensor, num_timesteps: int, knn_dim: int) -> np.ndarray:
    """Rows of ``T * K`` values folded to ``T * knn_dim`` (the nested sketch), as float32 numpy."""
    folded = fold_sketch(vectors.reshape(vectors.shape[0], num_timesteps, -1), knn_dim)
    return folded.reshape(vectors.shape[0], -1).numpy().astype(np.float32, copy=False)


class KnnIndex:
    """An hnswlib inner-product index over (possibly folded) rows; labels are dataset row ids."""

    def __init__(self, index: hnswlib.Index, num_timesteps: int, knn_dim: int):
        self.index, self.num_timesteps, self.knn_dim = index, num_timesteps, knn_dim

    @classmethod
    def build(
        cls, store: VectorStore, num_timesteps: int, knn_dim: int, m: int = 32, ef_construction: int = 200,
        chunk_rows: int = 8192,
    ) -> "KnnIndex":
        index = hnswlib.Index(space="ip", dim=num_timesteps * knn_dim)
        index.init_index(max_elements=max(store.num_rows, 1), M=m, ef_construction=ef_construction, random_seed=0)
        for row_ids, vectors in store.iter_chunks(chunk_rows):
            # as many threads as torch uses: hnswlib's default (every core) collapses on a shared machine
            index.add_items(
                knn_vectors(vectors, num_timesteps, knn_dim), row_ids.numpy(), num_threads=torch.get_num_threads()
            )
        return cls(index, num_timesteps, knn_dim)

    @classmethod
    def load(cls, path: str | os.PathLike, num_timesteps: int, knn_dim: int, num_rows: int) -> "KnnIndex":
        index = hnswlib.Index(space="ip", dim=num_timesteps * knn_dim)
        index.load_index(str(path), max_elements=max(num_rows, 1))
        if index.get_current_count() != num_rows:
            raise ValueError(f"{path} holds {index.get_current_count()} rows, the store {num_rows}")
        return cls(index, num_timesteps, knn_dim)

    def save(self, path: str | os.PathLike) -> None:
        temporary = f"{path}.tmp"
        self.index.save_index(temporary)
        os.replace(temporary, Path(path))

    def candidates(self, query: torch.Tensor, count: int, ef: int | None = None) -> list[int]:
        """Row ids of the ``count`` approximate nearest rows by inner product."""
        total = self.index.get_current_count()
        count = min(count, total)
        if count == 0:
            return []
        self.index.set_ef(max(ef or 0, count, 64))
        vector = knn_vectors(query.reshape(1, -1).to(torch.float32), self.num_timesteps, self.knn_dim)
        labels, _ = self.index.knn_query(vector, k=count, num_threads=1)
        return [int(label) for label in labels[0]]

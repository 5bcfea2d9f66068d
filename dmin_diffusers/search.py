"""Exact scoring over the stored rows, and the HNSW index (hnswlib, inner product) built from them."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import hnswlib
import numpy as np
import torch

from .hnsw import HNSW_SPACE, build_hnsw, query_hnsw
from .knn_projection import KNN_PROJECTION_NAME, project, save_projection
from .preconditioner import Preconditioner
from .sketch import fold_sketch
from .config import DMinConfig
from .store import CHUNK_ROWS, VectorStore, sync_file

#: how many rows a query returns unless told otherwise
DEFAULT_TOP_K = 10

KNN_NAME = "knn.bin"
#: the files of the HNSW index, both optional (rebuilt from the rows when missing)
KNN_FILES = (KNN_NAME, KNN_PROJECTION_NAME)


def exact_top_k(
    store: VectorStore, query: torch.Tensor, top_k: int, chunk_rows: int = CHUNK_ROWS,
    preconditioner: Preconditioner | None = None,
):
    """Scores of ``query`` (``row_dim`` values) against every stored row, streamed in chunks: inner products, or
    the ``preconditioner``'s scores.

    Returns ``(row_ids, scores)``: the ``min(top_k, rows)`` best rows, highest score first.
    """
    score = _scorer(query, preconditioner)
    best_ids = torch.zeros(0, dtype=torch.int64)
    best_scores = torch.zeros(0, dtype=torch.float32)
    for row_ids, vectors in store.iter_chunks(chunk_rows):
        scores = torch.cat([best_scores, score(row_ids, vectors)])
        ids = torch.cat([best_ids, row_ids])
        keep = torch.topk(scores, min(top_k, len(scores))).indices
        best_ids, best_scores = ids[keep], scores[keep]
    order = _stable_descending(best_scores, best_ids)
    return best_ids[order].tolist(), best_scores[order].tolist()


def _scorer(query: torch.Tensor, preconditioner: Preconditioner | None):
    """``(row_ids, (n, row_dim) rows) -> (n,)`` scores of ``query``."""
    if preconditioner is None or preconditioner.is_identity:
        flat = query.reshape(-1).to(torch.float32)
        return lambda row_ids, vectors: vectors @ flat
    return preconditioner.row_scorer(query)


def _stable_descending(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sort by score, highest first, ties broken by the lower row id (so results are reproducible)."""
    by_id = torch.argsort(ids)
    by_score = torch.argsort(scores[by_id], descending=True, stable=True)
    return by_id[by_score]


def knn_vectors(
    vectors: torch.Tensor, num_timesteps: int, knn_dim: int, projection: torch.Tensor | None = None
) -> np.ndarray:
    """Rows of ``T * K`` values as the HNSW index's ``T * knn_dim`` float32 vectors: projected on ``projection``
    (:mod:`~dmin_diffusers.knn_projection`) when given, else folded to the nested sketch of size ``knn_dim``
    (rows already mapped into a preconditioner's geometry, when there is one)."""
    if projection is not None:
        return project(vectors, projection).numpy()
    folded = fold_sketch(vectors.reshape(vectors.shape[0], num_timesteps, -1), knn_dim)
    return folded.reshape(vectors.shape[0], -1).numpy().astype(np.float32, copy=False)


class KnnIndex:
    """An hnswlib inner-product index over projected or folded rows; labels are dataset row ids. Saved as
    ``knn.bin`` and, for a projection, ``knn_projection.safetensors`` beside it. With a ``preconditioner``, rows
    and queries are mapped into its geometry first (:meth:`Preconditioner.map_rows`), so the graph ranks by the
    preconditioned score."""

    def __init__(
        self, index: hnswlib.Index, num_timesteps: int, knn_dim: int, projection: torch.Tensor | None = None,
        preconditioner: Preconditioner | None = None,
    ):
        self.index, self.num_timesteps, self.knn_dim, self.projection = index, num_timesteps, knn_dim, projection
        self.preconditioner = None if preconditioner is None or preconditioner.is_identity else preconditioner
        self._lock = threading.Lock()  # ``set_ef`` is shared state of the hnswlib index: one query at a time

    @classmethod
    def build(
        cls, store: VectorStore, num_timesteps: int, knn_dim: int, m: int = DMinConfig.hnsw_m,
        ef_construction: int = DMinConfig.hnsw_ef_construction,
        chunk_rows: int = CHUNK_ROWS, projection: torch.Tensor | None = None,
        preconditioner: Preconditioner | None = None,
    ) -> "KnnIndex":
        knn = cls(None, num_timesteps, knn_dim, projection, preconditioner)  # its row_vectors feed the graph
        chunks = ((row_ids.numpy(), knn.row_vectors(vectors, row_ids))
                  for row_ids, vectors in store.iter_chunks(chunk_rows))
        knn.index = build_hnsw(chunks, num_timesteps * knn_dim, store.num_rows, m, ef_construction)
        return knn

    def mapped(self, vectors: torch.Tensor, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, row_dim)`` rows (or, without ``row_ids``, queries) in the preconditioner's geometry, if any."""
        if self.preconditioner is None:
            return vectors.to(torch.float32)
        shaped = vectors.reshape(len(vectors), self.num_timesteps, -1)
        if row_ids is None:
            return torch.stack([self.preconditioner.map_query(q) for q in shaped]).reshape(len(vectors), -1)
        return self.preconditioner.map_rows(shaped, row_ids).reshape(len(vectors), -1)

    def row_vectors(self, vectors: torch.Tensor, row_ids: torch.Tensor) -> np.ndarray:
        """The HNSW vectors of stored rows."""
        return knn_vectors(self.mapped(vectors, row_ids), self.num_timesteps, self.knn_dim, self.projection)

    @classmethod
    def load(
        cls, path: str | os.PathLike, num_timesteps: int, knn_dim: int, num_rows: int,
        projection: torch.Tensor | None = None, preconditioner: Preconditioner | None = None,
    ) -> "KnnIndex":
        index = hnswlib.Index(space=HNSW_SPACE, dim=num_timesteps * knn_dim)
        index.load_index(str(path), max_elements=max(num_rows, 1))
        if index.get_current_count() != num_rows:
            raise ValueError(f"{path} holds {index.get_current_count()} rows, the store {num_rows}")
        return cls(index, num_timesteps, knn_dim, projection, preconditioner)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``knn.bin`` (and the projection, if any) into ``directory``, each atomically (a temporary file,
        synced, then renamed; removed on failure)."""
        if self.projection is not None:
            save_projection(self.projection, Path(directory) / KNN_PROJECTION_NAME)
        temporary = Path(directory) / f"{KNN_NAME}.tmp"
        try:
            with self._lock:
                self.index.save_index(str(temporary))
            sync_file(temporary)
            os.replace(temporary, Path(directory) / KNN_NAME)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def candidates(
        self, query: torch.Tensor, count: int, ef: int | None = None, mapped: torch.Tensor | None = None
    ) -> list[int]:
        """Row ids of the ``count`` approximate nearest rows by inner product (``mapped``: the query already in the
        preconditioner's geometry, from :meth:`Preconditioner.query_geometry`)."""
        total = self.index.get_current_count()
        count = min(count, total)
        if count == 0:
            return []
        mapped = self.mapped(query.reshape(1, -1)) if mapped is None else mapped.reshape(1, -1)
        vector = knn_vectors(mapped, self.num_timesteps, self.knn_dim, self.projection)
        with self._lock:
            labels = query_hnsw(self.index, vector, count, ef)
        return labels[0].tolist()


#: HNSW candidates re-ranked per requested row when the HNSW vectors are smaller than the rows: with the default
#: projection, recall@10 against exact search was 0.99-1.0 on real rows and on 100k rows mixed from them, 0.55 on
#: 100k copies differing only by noise (benchmarks/knn_recall.py)
OVERSAMPLING = 4


def approximate_top_k(knn: KnnIndex, store: VectorStore, query: torch.Tensor, top_k: int, projection_dim: int):
    """HNSW proposes candidates (``OVERSAMPLING`` times ``top_k`` when its vectors are smaller than the rows),
    which are scored exactly on the stored rows (in the HNSW index's preconditioned geometry, if any). Returns
    ``(row_ids, scores)`` as :func:`exact_top_k`."""
    oversampling = 1 if knn.knn_dim == projection_dim and knn.projection is None else OVERSAMPLING
    if knn.preconditioner is None:
        candidates, score = knn.candidates(query, top_k * oversampling), _scorer(query, None)
    else:  # the query's geometry once, for the graph and the re-ranking
        geometry = knn.preconditioner.query_geometry(query)
        candidates = knn.candidates(query, top_k * oversampling, mapped=geometry.mapped)
        score = knn.preconditioner.row_scorer(geometry)
    scores = score(torch.as_tensor(candidates, dtype=torch.int64), store.get_rows(candidates))
    order = torch.argsort(scores, descending=True, stable=True)[:top_k]
    return [candidates[i] for i in order.tolist()], scores[order].tolist()

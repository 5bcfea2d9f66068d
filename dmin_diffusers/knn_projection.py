"""The projection of DMin rows to the HNSW index's small vectors: per-timestep principal components.

Folding a sketch to fewer buckets keeps inner products unbiased but noisy; gradient rows are far from isotropic,
so their leading principal directions keep much more of the ranking per dimension (``benchmarks/knn_recall.py``).
Each timestep's ``K`` values are projected on the top ``knn_dim`` right singular vectors of a sample of the stored
rows (uncentred: the index ranks by inner product). The ``(T, K, knn_dim)`` float32 matrix is saved beside
``knn.bin`` as safetensors and validated when loaded; HNSW candidates are re-ranked on the full rows, so the
projection decides only which rows are looked at.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .store import save_tensors_atomic

KNN_PROJECTION_NAME = "knn_projection.safetensors"
#: rows the principal components are fitted on (evenly spaced over the index)
SAMPLE_ROWS = 4096
_POWER_ITERATIONS = 4


def sample_row_ids(row_ids: np.ndarray, count: int = SAMPLE_ROWS) -> list[int]:
    """Up to ``count`` row ids evenly spaced over the sorted ``row_ids``."""
    ordered = np.sort(np.asarray(row_ids, dtype=np.int64))
    if len(ordered) <= count:
        return ordered.tolist()
    return ordered[np.linspace(0, len(ordered) - 1, count).round().astype(np.int64)].tolist()


def fit_projection(sample: torch.Tensor, knn_dim: int, seed: int) -> torch.Tensor:
    """The ``(T, K, knn_dim)`` projection from a ``(n, T, K)`` sample of rows: for each timestep, the top right
    singular vectors (randomised SVD seeded with ``seed``); zero columns where the sample has fewer than
    ``knn_dim`` rows."""
    count, num_timesteps, dim = sample.shape
    rank = min(knn_dim, count, dim)
    projection = torch.zeros(num_timesteps, dim, knn_dim, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for t in range(num_timesteps):
            _, _, vectors = torch.svd_lowrank(sample[:, t, :].float(), q=rank, niter=_POWER_ITERATIONS)
            projection[t, :, :rank] = vectors
    return projection


def project(vectors: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """``(n, T * K)`` rows to their ``(n, T * knn_dim)`` HNSW vectors."""
    num_timesteps, dim, knn_dim = projection.shape
    rows = vectors.reshape(vectors.shape[0], num_timesteps, dim).to(torch.float32)
    return torch.einsum("ntk,tkd->ntd", rows, projection).reshape(vectors.shape[0], num_timesteps * knn_dim)


def save_projection(projection: torch.Tensor, path: str | os.PathLike) -> None:
    """Writes the projection atomically (a temporary file, synced, then a rename)."""
    save_tensors_atomic({"projection": projection.contiguous()}, Path(path))


def load_projection(path: str | os.PathLike, num_timesteps: int, dim: int, knn_dim: int) -> torch.Tensor:
    """Reads a projection, checking it is one float32 ``(T, K, knn_dim)`` tensor of finite values; a
    ``ValueError`` names the file otherwise."""
    name = Path(path).name
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{name} is not a readable safetensors file ({error})") from None
    projection = tensors.get("projection")
    expected = (num_timesteps, dim, knn_dim)
    if set(tensors) != {"projection"} or projection.dtype != torch.float32 or tuple(projection.shape) != expected:
        found = {key: (str(value.dtype), tuple(value.shape)) for key, value in tensors.items()}
        raise ValueError(f"{name} holds {found}, expected one float32 'projection' of shape {expected}")
    if not bool(torch.isfinite(projection).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return projection

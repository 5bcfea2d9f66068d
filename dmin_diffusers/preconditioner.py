"""Preconditioned influence scores, fitted from the stored rows after caching (no gradient is computed).

DMin's rows share one large common direction: every row scores nearly alike and the ranking lives in what is left.
A preconditioner, fitted per timestep ``t`` from the stored rows ``g`` (``K`` values each), changes the geometry in
which a query ``q`` is compared with them:

* ``"none"``: ``q · g`` (DMin; every index built before preconditioning existed scores this way);
* ``"centered"``: the cosine of ``q - μ`` and ``g - μ``, ``μ`` the rows' mean (the common direction removed);
* ``"kernel"``: TRAK's ``qᵀ (C + λI)⁻¹ g / ‖q‖``, ``C = ΦᵀΦ / N`` the rows' second-moment matrix, so that
  directions every row shares count less and rare ones more;
* ``"centered-kernel"``: the same with ``q - μ``, ``g - μ`` and the covariance.

The query is normalised in the preconditioned geometry (``‖u‖² = uᵀ(C + λI)⁻¹u``), so that each timestep weighs
alike; rows are normalised too where the method says so (``"centered"``: a cosine). ``λ = damping · s₁``, with
``s₁`` the largest eigenvalue of ``C``. ``C`` is kept as its top ``rank`` eigenpairs plus one value for the rest of
the spectrum (its mean), which is what makes the file small: ``T · K · rank`` float32 values, whatever the number of
rows. Fitting streams the rows in chunks (randomised range finding, one power iteration: three passes).

Every score is an inner product after a linear map of the query and of the rows (:meth:`Preconditioner.map_query`,
:meth:`Preconditioner.map_rows`), so the HNSW index is built on mapped rows and ranks in the same geometry; exact
search applies the (cheap) query side only (:meth:`Preconditioner.prepare_query`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .config import PRECONDITIONINGS, check_method
from .preconditionings import preconditioning_named
from .store import save_tensors_atomic

__all__ = ["PRECONDITIONINGS", "PRECONDITIONER_NAME", "Preconditioner", "rows_digest"]

logger = logging.getLogger(__name__)

PRECONDITIONER_NAME = "preconditioner.safetensors"
#: eigenpairs kept per timestep (at most; fewer when there are fewer rows or values)
MAX_RANK = 256
_OVERSAMPLING = 16
_FORMAT = 1

#: a chunked view of the rows: a function returning a fresh iterator of ``(row_ids, (n, T, K) rows)`` each call
RowChunks = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def is_centred(method: str) -> bool:
    return preconditioning_named(method).centred


def uses_kernel(method: str) -> bool:
    return preconditioning_named(method).kernel


def normalises_rows(method: str) -> bool:
    """Whether a method divides each row by its norm in the preconditioned geometry (needs a per-row scale)."""
    return preconditioning_named(method).normalise_rows


@dataclass(frozen=True)
class Preconditioner:
    """A fitted preconditioner: per timestep the rows' mean, the top eigenpairs of their second-moment matrix and
    the level of the rest of the spectrum, and (for row-normalising methods) each row's scale.

    ``gain[t]`` and ``residual_gain[t]`` are the factors ``(s + λ)^-1/2`` of the kept eigenvalues and of the
    rest; the preconditioned inner product of ``x`` and ``y`` at timestep ``t`` is that of ``W x`` and ``W y`` with
    ``W = V diag(gain) Vᵀ + residual_gain (I - V Vᵀ)``.
    """

    method: str
    damping: float
    mean: torch.Tensor  # (T, K); zeros unless centred
    basis: torch.Tensor  # (T, K, r); r = 0 without a kernel
    gain: torch.Tensor  # (T, r)
    residual_gain: torch.Tensor  # (T,)
    row_ids: torch.Tensor  # (N,) int64, sorted; empty unless the rows are normalised
    row_scale: torch.Tensor  # (N, T) float32: 1 / the row's norm in the preconditioned geometry
    rows_digest: str = ""
    normalize_rows: bool = False

    @property
    def num_timesteps(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    @property
    def rank(self) -> int:
        return self.basis.shape[2]

    @property
    def is_identity(self) -> bool:
        return self.method == "none"

    @classmethod
    def identity(cls, num_timesteps: int, dim: int) -> "Preconditioner":
        """``"none"``: scores are the plain inner products (nothing to fit, no file)."""
        return cls("none", 0.01, torch.zeros(num_timesteps, dim), torch.zeros(num_timesteps, dim, 0),
                   torch.zeros(num_timesteps, 0), torch.ones(num_timesteps), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, num_timesteps))

    # --------------------------------------------------------------------------------------------------------
    # fitting
    # --------------------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        rows: torch.Tensor | RowChunks,
        method: str = "kernel",
        damping: float = 0.01,
        *,
        rank: int = MAX_RANK,
        seed: int = 0,
        rows_digest: str = "",
        normalize_rows: bool | None = None,
    ) -> "Preconditioner":
        """Fits ``method`` from the rows: an ``(N, T, K)`` tensor, or a function returning a fresh iterator of
        ``(row_ids, (n, T, K) rows)`` chunks each time it is called (the store, streamed; called up to four
        times). ``damping``: ``λ`` as a fraction of each timestep's largest eigenvalue. ``seed`` seeds the
        randomised range finder. ``normalize_rows``: divide each row by its norm in the preconditioned geometry
        (scores become cosines there); by default only ``"centered"`` does."""
        check_method(method, damping)
        chunks = _as_chunks(rows)
        count, total, trace = _first_moments(chunks)  # the shapes come with the moments: no extra read
        if count == 0:
            raise ValueError("cannot fit a preconditioner on an index without rows")
        num_timesteps, dim = total.shape
        mean = total / count if is_centred(method) else torch.zeros(num_timesteps, dim, dtype=torch.float64)
        basis = torch.zeros(num_timesteps, dim, 0, dtype=torch.float32)
        gain = torch.zeros(num_timesteps, 0, dtype=torch.float32)
        residual_gain = torch.ones(num_timesteps, dtype=torch.float32)
        if uses_kernel(method):
            basis, eigenvalues = _top_eigenpairs(chunks, mean, count, min(rank, dim, count), seed)
            centred_trace = trace / count - (mean**2).sum(dim=1)
            gain, residual_gain = _gains(eigenvalues, centred_trace, dim, damping)
        normalize = normalises_rows(method) if normalize_rows is None else bool(normalize_rows)
        if normalize and method == "none":
            raise ValueError("rows are already unit vectors without a preconditioner: normalize_rows needs a method")
        fitted = cls(method, float(damping), mean.float(), basis, gain, residual_gain,
                     torch.zeros(0, dtype=torch.int64), torch.zeros(0, num_timesteps), rows_digest, normalize)
        if normalize:
            fitted = fitted._with_row_scales(chunks)
        return fitted

    def _with_row_scales(self, chunks: RowChunks) -> "Preconditioner":
        ids, scales, degenerate = [], [], 0
        for row_ids, vectors in chunks():
            norms = self.map_rows(vectors, scaled=False).norm(dim=2)
            at_mean = norms <= 0
            degenerate += int(at_mean.any(dim=1).sum())
            ids.append(row_ids.to(torch.int64))
            scales.append(1.0 / torch.where(at_mean, torch.ones_like(norms), norms))
        if degenerate:  # a one-row index, or rows that are all alike at a timestep
            logger.warning(f"{degenerate} stored row(s) equal the rows' mean at some timestep: their centred cosine "
                           "is undefined there, and they score 0 at that timestep")
        row_ids, scale = torch.cat(ids), torch.cat(scales)
        order = torch.argsort(row_ids)
        return replace(self, row_ids=row_ids[order], row_scale=scale[order].float())

    # --------------------------------------------------------------------------------------------------------
    # applying
    # --------------------------------------------------------------------------------------------------------

    def _whiten(self, vectors: torch.Tensor, powers: tuple[float, ...] = (1.0,)) -> list[torch.Tensor]:
        """``W^p`` applied per timestep to ``(n, T, K)`` vectors for each ``p`` of ``powers`` (1: ``W``; 2: ``W²``,
        the kernel). The basis is read twice whatever the number of powers: queries are memory-bound on it."""
        if not uses_kernel(self.method):
            return [vectors for _ in powers]
        by_timestep = vectors.transpose(0, 1)  # (T, n, K): batched matrix products, no copy of the basis
        coefficients = torch.bmm(by_timestep, self.basis)  # (T, n, r)
        residuals = [self.residual_gain[:, None, None] ** power for power in powers]
        kept = torch.cat([(self.gain[:, None, :] ** power - residual) * coefficients
                          for power, residual in zip(powers, residuals)], dim=1)
        back = torch.bmm(self.basis, kept.transpose(1, 2)).transpose(1, 2).split(len(vectors), dim=1)  # reads V once
        return [(residual * by_timestep + part).transpose(0, 1) for residual, part in zip(residuals, back)]

    def map_rows(self, vectors: torch.Tensor, row_ids: torch.Tensor | None = None, scaled: bool = True) -> torch.Tensor:
        """``(n, T, K)`` rows in the preconditioned geometry: ``W (g - μ)``, times the row's scale when the method
        normalises rows (``row_ids`` then names them)."""
        (mapped,) = self._whiten(vectors.to(torch.float32) - self.mean[None])
        if scaled and self.normalize_rows:
            mapped = mapped * self.scales(row_ids)[:, :, None]
        return mapped

    def query_geometry(self, query: torch.Tensor) -> "QueryGeometry":
        """Everything a ``(T, K)`` query needs, computed once: its HNSW vector ``W u / ‖W u‖`` (``u = q - μ``; its
        inner product with :meth:`map_rows` of a row is the row's score), and for exact scoring ``v = W² u / ‖W u‖``
        and ``offset_t = v_t · μ_t``, such that a stored row ``g`` scores ``(v_t · g_t - offset_t) · scale_t(g)`` at
        timestep ``t``. ``"none"`` leaves the query as it is."""
        query = query.reshape(self.num_timesteps, self.dim).to(torch.float32)
        if self.is_identity:
            return QueryGeometry(query, query, torch.zeros(self.num_timesteps))
        whitened, kernel = (mapped[0] for mapped in self._whiten((query - self.mean)[None], (1.0, 2.0)))
        norm = _safe_norm(whitened)
        vector = kernel / norm
        return QueryGeometry(whitened / norm, vector, (vector * self.mean).sum(dim=1))

    def map_query(self, query: torch.Tensor) -> torch.Tensor:
        """The query's HNSW vector (:meth:`query_geometry`)."""
        return self.query_geometry(query).mapped

    def prepare_query(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v, offset)`` of :meth:`query_geometry`: what exact scoring needs."""
        geometry = self.query_geometry(query)
        return geometry.vector, geometry.offset

    def row_scorer(
        self, query: "torch.Tensor | QueryGeometry"
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A function of ``(row_ids, (n, T * K) rows)`` giving the rows' ``(n,)`` scores for ``query`` (a ``(T, K)``
        query or its :meth:`query_geometry`; without row scales a score is one inner product per row)."""
        geometry = query if isinstance(query, QueryGeometry) else self.query_geometry(query)
        vector, offset = geometry.vector, geometry.offset
        if not self.normalize_rows:
            flat, constant = vector.reshape(-1), float(offset.sum())
            return lambda row_ids, rows: rows.to(torch.float32) @ flat - constant

        def score(row_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            per_timestep = torch.stack([rows[:, t * self.dim:(t + 1) * self.dim].to(torch.float32) @ vector[t]
                                        for t in range(self.num_timesteps)], dim=1)
            return ((per_timestep - offset[None]) * self.scales(row_ids)).sum(dim=1)

        return score

    def scales(self, row_ids: torch.Tensor | list[int] | None) -> torch.Tensor:
        """``(n, T)`` per-row scales of the given rows (ones unless the method normalises rows)."""
        if not self.normalize_rows:
            count = 0 if row_ids is None else len(row_ids)
            return torch.ones(count, self.num_timesteps)
        if row_ids is None:
            raise ValueError(f"the {self.method!r} preconditioner needs the rows' ids")
        ids = torch.as_tensor(row_ids, dtype=torch.int64)
        positions = torch.searchsorted(self.row_ids, ids).clamp(max=max(len(self.row_ids) - 1, 0))
        if len(ids) and (len(self.row_ids) == 0 or bool((self.row_ids[positions] != ids).any())):
            raise ValueError("the preconditioner was not fitted on these rows; refit it (AttributionIndex.refit)")
        return self.row_scale[positions]

    def timestep_scores(self, query: torch.Tensor, rows: torch.Tensor, row_ids=None) -> torch.Tensor:
        """``(n, T)``: each of the ``(n, T, K)`` rows' score at each timestep (the score is their sum)."""
        vector, offset = self.prepare_query(query)
        rows = rows.reshape(rows.shape[0], self.num_timesteps, self.dim).to(torch.float32)
        raw = torch.einsum("ntk,tk->nt", rows, vector) - offset[None]
        if self.normalize_rows:
            raw = raw * self.scales(torch.arange(len(rows)) if row_ids is None else row_ids)
        return raw

    def scores(self, queries: torch.Tensor, rows: torch.Tensor, row_ids=None) -> torch.Tensor:
        """``(Q, N)``: the score of every ``(N, T, K)`` row for every ``(Q, T, K)`` query (row ids default to the
        positions, as when the preconditioner was fitted on the same tensor)."""
        return torch.stack([self.timestep_scores(q, rows, row_ids).sum(dim=1) for q in queries])

    # --------------------------------------------------------------------------------------------------------
    # files
    # --------------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Writes the preconditioner as one safetensors file (atomically), its settings in the metadata."""
        tensors = {"mean": self.mean, "basis": self.basis, "gain": self.gain, "residual_gain": self.residual_gain,
                   "row_ids": self.row_ids, "row_scale": self.row_scale}
        metadata = {"method": self.method, "damping": repr(self.damping), "rows_digest": self.rows_digest,
                    "normalize_rows": str(self.normalize_rows), "format": str(_FORMAT)}
        save_tensors_atomic({k: v.contiguous() for k, v in tensors.items()}, Path(path), metadata=metadata)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, method: str, damping: float, num_timesteps: int, dim: int,
        rows_digest: str, row_ids: np.ndarray, name: str | None = None,
    ) -> "Preconditioner":
        """Reads a preconditioner and checks it is the one these settings and rows call for: the method, damping
        and rows it was fitted from, every tensor's dtype and shape, finite values, an orthonormal basis and
        positive gains. A ``ValueError`` names the file otherwise."""
        name = name or Path(path).name
        tensors, metadata = _read(path, name)
        wanted = {"method": method, "damping": repr(float(damping)), "rows_digest": rows_digest,
                  "normalize_rows": str(normalises_rows(method)), "format": str(_FORMAT)}
        found = {key: metadata.get(key) for key in wanted}
        for key, value in wanted.items():
            if found[key] != value:
                raise ValueError(f"{name}: its {key} is {found[key]!r}, this index's {value!r}; not its preconditioner")
        fitted = cls(method, float(damping), **tensors, rows_digest=rows_digest, normalize_rows=normalises_rows(method))
        _check_shapes(fitted, name, num_timesteps, dim, row_ids)
        return fitted


@dataclass(frozen=True)
class QueryGeometry:
    """A query prepared by :meth:`Preconditioner.query_geometry`."""

    mapped: torch.Tensor  # (T, K): the HNSW vector
    vector: torch.Tensor  # (T, K): what stored rows are multiplied with
    offset: torch.Tensor  # (T,): subtracted from each timestep's product


def rows_digest(shards: list[dict]) -> str:
    """What ties a preconditioner to the rows it was fitted on: a digest of the stored shards' checksums."""
    listed = sorted((shard["file"], shard["sha256"]) for shard in shards)
    return "shards-sha256:" + hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def _safe_norm(mapped: torch.Tensor) -> torch.Tensor:
    """The per-timestep norms of a mapped query, 1 where it is zero (every row then scores 0 at that timestep)."""
    norms = mapped.norm(dim=-1, keepdim=True)
    at_mean = norms <= 0
    if bool(at_mean.any()):
        logger.warning(f"the query equals the rows' mean at {int(at_mean.sum())} timestep(s): its preconditioned "
                       "score is undefined there, and every row scores 0 at them")
    return torch.where(at_mean, torch.ones_like(norms), norms)


def _as_chunks(rows: torch.Tensor | RowChunks) -> RowChunks:
    if callable(rows):
        return rows
    if rows.dim() != 3:
        raise ValueError(f"rows must be (N, T, K), got shape {tuple(rows.shape)}")

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(rows), 8192):
            yield torch.arange(start, min(start + 8192, len(rows))), rows[start:start + 8192]

    return chunks


def _first_moments(chunks: RowChunks) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Number of rows, their sum ``(T, K)`` and the sum of their squared norms ``(T,)``, in float64."""
    count, total, trace = 0, None, None
    for _, vectors in chunks():
        vectors = vectors.to(torch.float64)
        count += len(vectors)
        total = vectors.sum(dim=0) if total is None else total + vectors.sum(dim=0)
        squares = (vectors**2).sum(dim=(0, 2))
        trace = squares if trace is None else trace + squares
    return count, total, trace


def _covariance_times(chunks: RowChunks, mean: torch.Tensor, count: int, probes: torch.Tensor) -> torch.Tensor:
    """``C_t @ probes_t`` for every timestep, ``C_t`` the rows' centred second-moment matrix (one pass)."""
    product = torch.zeros_like(probes, dtype=torch.float64)
    centre = mean.float()
    for _, vectors in chunks():
        vectors = vectors.to(torch.float32) - centre[None]  # centred first: no cancellation in float32
        for t in range(vectors.shape[1]):
            block = vectors[:, t, :]
            product[t] += (block.T @ (block @ probes[t])).double()
    return product / count


def _top_eigenpairs(
    chunks: RowChunks, mean: torch.Tensor, count: int, rank: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``rank`` eigenvectors ``(T, K, rank)`` and eigenvalues ``(T, rank)`` of each timestep's centred
    second-moment matrix: a randomised range finder with one power iteration (three passes over the rows)."""
    num_timesteps, dim = mean.shape
    width = min(rank + _OVERSAMPLING, dim)
    generator = torch.Generator().manual_seed(seed)
    probes = torch.randn(num_timesteps, dim, width, generator=generator)
    for _ in range(2):  # range finding, then one power iteration
        probes = torch.linalg.qr(_covariance_times(chunks, mean, count, probes)).Q.float()
    projected = torch.einsum("tkr,tks->trs", probes.double(), _covariance_times(chunks, mean, count, probes))
    eigenvalues, vectors = torch.linalg.eigh((projected + projected.transpose(1, 2)) / 2)
    eigenvalues, vectors = eigenvalues.flip(-1)[:, :rank], vectors.flip(-1)[:, :, :rank]
    return torch.einsum("tkr,trs->tks", probes.double(), vectors).float(), eigenvalues.clamp(min=0).float()


def _gains(
    eigenvalues: torch.Tensor, trace: torch.Tensor, dim: int, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors ``(s + λ)^-1/2`` of the kept eigenvalues and of the mean of the rest, ``λ = damping · s₁``."""
    largest = eigenvalues[:, :1].double()
    if bool((largest <= 0).any()):
        raise ValueError("the stored rows do not vary at some timestep: a kernel cannot be fitted")
    damping_value = damping * largest
    rest = dim - eigenvalues.shape[1]
    residual = ((trace[:, None] - eigenvalues.double().sum(dim=1, keepdim=True)) / max(rest, 1)).clamp(min=0)
    gain = (eigenvalues.double() + damping_value).rsqrt()
    residual_gain = (residual + damping_value).rsqrt()[:, 0]
    return gain.float(), residual_gain.float()


def _read(path: str | os.PathLike, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    expected = {"mean": torch.float32, "basis": torch.float32, "gain": torch.float32,
                "residual_gain": torch.float32, "row_ids": torch.int64, "row_scale": torch.float32}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = set(handle.keys())
            if keys != set(expected):
                raise ValueError(f"{name} holds the tensors {sorted(keys)}, expected {sorted(expected)}")
            tensors = {key: handle.get_tensor(key) for key in expected}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{name} is not a readable safetensors file ({error})") from None
    for key, dtype in expected.items():
        if tensors[key].dtype != dtype:
            raise ValueError(f"{name}: {key} is {tensors[key].dtype}, expected {dtype}")
    return tensors, metadata


def _check_shapes(fitted: Preconditioner, name: str, num_timesteps: int, dim: int, row_ids: np.ndarray) -> None:
    rank = fitted.basis.shape[-1] if fitted.basis.dim() == 3 else -1
    normalised = fitted.normalize_rows
    shapes = {
        "mean": (num_timesteps, dim), "basis": (num_timesteps, dim, rank), "gain": (num_timesteps, rank),
        "residual_gain": (num_timesteps,),
        "row_ids": (len(row_ids) if normalised else 0,), "row_scale": (len(row_ids) if normalised else 0, num_timesteps),
    }
    for key, shape in shapes.items():
        value = getattr(fitted, key)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: {key} has shape {tuple(value.shape)}, expected {shape}")
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: {key} holds NaN or infinite values")
    if not uses_kernel(fitted.method) and rank != 0:
        raise ValueError(f"{name}: a {fitted.method!r} preconditioner has no kernel, but the file holds one")
    if not is_centred(fitted.method) and bool(fitted.mean.any()):
        raise ValueError(f"{name}: a {fitted.method!r} preconditioner is not centred, but the file holds a mean")
    if bool((fitted.gain <= 0).any()) or bool((fitted.residual_gain <= 0).any()) or bool((fitted.row_scale <= 0).any()):
        raise ValueError(f"{name}: a gain or row scale is not positive: damaged")
    gram = torch.einsum("tkr,tks->trs", fitted.basis, fitted.basis)
    if rank > 0 and float((gram - torch.eye(rank)).abs().max()) > 1e-3:
        raise ValueError(f"{name}: its basis is not orthonormal: damaged")
    if normalised and not torch.equal(fitted.row_ids, torch.as_tensor(np.sort(row_ids), dtype=torch.int64)):
        raise ValueError(f"{name}: its row ids are not the stored rows'; not this index's preconditioner")

"""Scores of every method for the quality benchmark: one backward pass per (row, timestep) feeds the uncompressed
gradients (raw and normalised), their DMin sketches at several K, HNSW over the folded sketches, and the terms of
the compression-error theory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from dmin_diffusers.gradients import GradientSketcher, PreparedExample
from dmin_diffusers.hnsw import build_hnsw
from dmin_diffusers.preconditioner import Preconditioner
from dmin_diffusers.search import KnnIndex
from dmin_diffusers.sketch import SketchProjector, fold_sketch

from common import markdown_table

@dataclass
class Scores:
    """(queries, rows) score matrices per method, and the sketched rows for HNSW."""

    methods: dict[str, torch.Tensor]
    row_sketches: torch.Tensor  # (rows, T, K_max) float16
    query_sketches: torch.Tensor  # (queries, T, K_max) float32
    # Inner products of the normalised uncompressed gradients, for the error theory: query timestep t with row
    # timestep s (queries, rows, T, T), and each gradient's timesteps with each other (queries or rows, T, T).
    cross: torch.Tensor
    query_gram: torch.Tensor
    row_gram: torch.Tensor
    same_coordinate: torch.Tensor  # (queries, rows): sum_d (sum_t q_td r_td)^2, a coordinate colliding with itself
    seed_scores: dict[int, torch.Tensor]  # K -> (keys, queries, rows) DMin exact scores; key 0 is the package's


#: the preconditionings scored beside DMin's plain inner product (fitted on the stored rows, as an index does)
PRECONDITIONED = ("centered", "kernel", "centered-kernel")
PRECONDITIONING_DAMPING = 0.01


def preconditioned_methods(scores: Scores, dim: int) -> dict[str, torch.Tensor]:
    """DMin exact at K = ``dim`` under each of ``PRECONDITIONED``: the package's preconditioner fitted on the
    float16 row sketches folded to ``dim`` (what an index of that K stores), applied to the queries."""
    rows = fold_sketch(scores.row_sketches.float(), dim)
    queries = fold_sketch(scores.query_sketches, dim)
    name = f"DMin exact, K=2^{dim.bit_length() - 1}"
    return {f"{name}, {method}": Preconditioner.fit(rows, method, PRECONDITIONING_DAMPING).scores(queries, rows)
            for method in PRECONDITIONED}


def sketch_rows(projector: SketchProjector, normalised: torch.Tensor) -> torch.Tensor:
    """The package's sketch of already-normalised (T, D) gradients (split per parameter, as the hooks see them)."""
    out = []
    for row in normalised:
        accumulator = projector.new_accumulator()
        for index, piece in enumerate(torch.split(row, projector.parameter_sizes)):
            projector.accumulate(accumulator, index, piece)
        out.append(projector.finalize(accumulator))
    return torch.stack(out)


def gradient_scores(sketcher: GradientSketcher, rows: list[PreparedExample], queries: list[PreparedExample],
                    dims: tuple[int, ...], extra_seeds: int = 0, theory: bool = False) -> Scores:
    """Uncompressed (normalised and raw) and DMin scores of every query against every row; DMin exact scores also
    under ``extra_seeds`` other keys of the permutation and signs (``Scores.seed_scores``, for the fidelity table).
    With ``theory``, also the timestep cross products that the fidelity table's error theory needs (costly: T^2
    inner products per pair); without it those fields hold zeros."""
    main = sketcher.projector
    projectors = [main] + [SketchProjector(main.parameter_sizes, main.dim, sketcher.config.seed + 1 + i)
                           for i in range(extra_seeds)]
    q_raw = torch.stack([sketcher.flat_gradients(q, normalize=False) for q in queries])  # (Q, T, D)
    q_norm = F.normalize(q_raw, dim=-1)
    q_sketches = [torch.stack([sketch_rows(projector, q) for q in q_norm]) for projector in projectors]
    q_folded = [{dim: fold_sketch(q_sketch, dim) for dim in dims} for q_sketch in q_sketches]
    num_rows, (num_q, num_t, _) = len(rows), q_raw.shape
    raw_scores, norm_scores = torch.zeros(num_q, num_rows), torch.zeros(num_q, num_rows)
    pairs = num_t if theory else 1
    cross = torch.zeros(num_q, num_rows, pairs, pairs)
    row_gram = torch.zeros(num_rows, pairs, pairs)
    same_coordinate = torch.zeros(num_q, num_rows)
    seed_scores = {dim: torch.zeros(len(projectors), num_q, num_rows) for dim in dims}
    row_sketches = torch.zeros(num_rows, num_t, main.dim, dtype=torch.float16)
    for n, example in enumerate(rows):
        raw = sketcher.flat_gradients(example, normalize=False)
        normalised = F.normalize(raw, dim=-1)
        raw_scores[:, n] = torch.einsum("qtd,td->q", q_raw, raw)
        if theory:
            cross[:, n] = torch.einsum("qtd,sd->qts", q_norm, normalised)
            row_gram[n] = normalised @ normalised.T
            same_coordinate[:, n] = torch.einsum("qtd,td->qd", q_norm, normalised).square().sum(-1)
            norm_scores[:, n] = cross[:, n].diagonal(dim1=-2, dim2=-1).sum(-1)
        else:
            norm_scores[:, n] = torch.einsum("qtd,td->q", q_norm, normalised)
        for i, projector in enumerate(projectors):
            sketch = sketch_rows(projector, normalised).half()
            if i == 0:
                row_sketches[n] = sketch
            for dim in dims:
                row_folded = fold_sketch(sketch.float(), dim)
                seed_scores[dim][i, :, n] = torch.einsum("qtk,tk->q", q_folded[i][dim], row_folded)
        if n == 0:  # the benchmark's path must be the package's path
            reference = sketcher.sketch(example)
            assert torch.allclose(reference, row_sketches[0].float(), atol=2e-3), "sketch differs from the package"
    methods = {"uncompressed, no normalisation": raw_scores, "uncompressed, normalised": norm_scores}
    for dim in dims:
        methods[f"DMin exact, K=2^{dim.bit_length() - 1}"] = seed_scores[dim][0]
    query_gram = torch.einsum("qtd,qsd->qts", q_norm, q_norm)
    return Scores(methods, row_sketches, q_sketches[0], cross, query_gram, row_gram, same_coordinate, seed_scores)




def hnsw_top_rows(scores: Scores, dim: int, top_k: int) -> torch.Tensor:
    """(queries, top_k) rows of every query from an HNSW index over the rows folded to ``dim`` (the package's
    ``build_hnsw`` with its default graph parameters, one thread, queried by ``KnnIndex.candidates``)."""
    num_rows, num_t, _ = scores.row_sketches.shape
    vectors = fold_sketch(scores.row_sketches.float(), dim).reshape(num_rows, -1).numpy()
    index = build_hnsw([(np.arange(num_rows), vectors)], num_t * dim, num_rows, num_threads=1)
    knn = KnnIndex(index, num_t, dim)
    return torch.tensor([knn.candidates(fold_sketch(q, dim), top_k) for q in scores.query_sketches])


def method_top_rows(scores: Scores, hnsw_dims: tuple[int, ...], top_k: int) -> dict[str, torch.Tensor]:
    """(queries, top_k) most influential rows of every gradient method: exact scores and HNSW."""
    top = {name: torch.topk(matrix, top_k, dim=1).indices for name, matrix in scores.methods.items()}
    for dim in hnsw_dims:
        if dim <= scores.row_sketches.shape[-1]:
            top[f"DMin HNSW, K=2^{dim.bit_length() - 1}"] = hnsw_top_rows(scores, dim, top_k)
    return top


def select_queries(scores: Scores, chosen: list[int]) -> Scores:
    """The same scores restricted to some queries (for the fidelity table of one query set)."""
    return Scores({k: v[chosen] for k, v in scores.methods.items()}, scores.row_sketches,
                  scores.query_sketches[chosen], scores.cross[chosen], scores.query_gram[chosen], scores.row_gram,
                  scores.same_coordinate[chosen], {k: v[:, chosen] for k, v in scores.seed_scores.items()})


def fidelity_table(scores: Scores) -> str:
    """Spearman, top-10 overlap and RMS error of DMin exact against uncompressed normalised scores, per K, beside two
    predictions of the error's standard deviation for unit gradients. The simple one treats timesteps as
    independent: sum_t (1 + rho_t^2) / K. The exact one, for a random hash and signs shared by all timesteps, adds
    the covariance of correlated timesteps and removes a coordinate's collisions with itself:
    [sum_{t,s} (<q_t, q_s><r_t, r_s> + <q_t, r_s><q_s, r_t>) - 2 sum_d (sum_t q_td r_td)^2] / K. An error well
    above the exact prediction would mean the keyed permutation does not scatter coordinates like a random hash."""
    exact = scores.methods["uncompressed, normalised"]
    diagonal = scores.cross.diagonal(dim1=-2, dim2=-1)  # rho_t per (query, row, t)
    independent = diagonal.shape[-1] + diagonal.square().sum(-1)
    shared = (torch.einsum("qts,nts->qn", scores.query_gram, scores.row_gram)
              + torch.einsum("qnts,qnst->qn", scores.cross, scores.cross) - 2 * scores.same_coordinate)
    rows = []
    for dim, keyed in scores.seed_scores.items():
        spearman = np.mean([spearmanr(a, b)[0] for approx in keyed for a, b in zip(approx.numpy(), exact.numpy())])
        overlap = np.mean([len(set(torch.topk(a, 10).indices.tolist()) & set(torch.topk(b, 10).indices.tolist())) / 10
                           for approx in keyed for a, b in zip(approx, exact)])
        rms = float((keyed - exact).square().mean().sqrt())
        theories = [float((variance / dim).mean().sqrt()) for variance in (independent, shared)]
        rows.append([f"2^{dim.bit_length() - 1}", f"{spearman:.4f}", f"{overlap:.3f}", f"{rms:.4f}",
                     *(f"{t:.4f}" for t in theories)])
    header = f"Means over every (query, row) pair and {len(keyed)} keys of the permutation and signs.\n\n"
    return header + markdown_table(["K", "Spearman vs uncompressed", "top-10 overlap", "RMS score error",
                                    "theory sum_t (1 + rho_t^2) / K", "theory, exact for a random hash"], rows)

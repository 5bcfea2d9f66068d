"""The maths of the LDS benchmark: the subset masks and the fixed (timestep, noise) pairs, subset predictions, Spearman over subsets, the retraining noise ceiling, and
means with standard errors over queries."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.stats import rankdata

SUBSET_SEED = 12345  # the masks' generator
PAIRS_SEED = 777  # the fixed (timestep, noise) pairs of the model output


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties given their average rank (as Spearman's rho needs)."""
    return rankdata(values, axis=-1)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of ``a`` and ``b`` along the last axis (broadcast over the others): the Pearson correlation
    of their ranks; NaN where either side is constant."""
    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    ra = ra - ra.mean(axis=-1, keepdims=True)
    rb = rb - rb.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(-1) / denominator


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(Q, M): a method's prediction for subset m is the sum of its scores over the rows in the subset."""
    return np.asarray(scores, dtype=np.float64) @ np.asarray(masks, dtype=np.float64).T


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """(Q,) linear datamodeling score of each query: Spearman over the M subsets between the method's prediction
    and minus the loss averaged over training seeds. ``scores`` (Q, N), ``masks`` (M, N), ``losses`` (S, M, Q)."""
    target = -np.asarray(losses, dtype=np.float64).mean(axis=0).T  # (Q, M)
    return spearman(subset_predictions(scores, masks), target)


def seed_agreement(losses: np.ndarray) -> np.ndarray:
    """(Q,) Spearman over subsets between the losses of two training seeds, averaged over every pair of seeds."""
    losses = np.asarray(losses, dtype=np.float64)
    pairs = list(itertools.combinations(range(losses.shape[0]), 2))
    if not pairs:
        raise ValueError("the noise ceiling needs at least two training seeds")
    return np.mean([spearman(losses[a].T, losses[b].T) for a, b in pairs], axis=0)


def spearman_brown(r: float, seeds: int) -> float:
    """Reliability of the mean of ``seeds`` equally noisy measurements whose pairwise correlation is ``r``:
    ``S r / (1 + (S - 1) r)``."""
    return seeds * r / (1 + (seeds - 1) * r)


def ceiling(losses: np.ndarray) -> dict[str, float]:
    """The retraining noise ceiling: the seed-to-seed Spearman ``r`` (mean ± s.e. over queries), the Spearman-Brown
    reliability of the seed-averaged target, and its square root, the correlation that a perfect predictor (the
    expected loss over training seeds) would reach with that target."""
    per_query = seed_agreement(losses)
    mean, error = mean_se(per_query)
    reliability = spearman_brown(max(mean, 0.0), losses.shape[0])
    return {"seed_to_seed": mean, "seed_to_seed_se": error, "seeds": int(losses.shape[0]),
            "spearman_brown": reliability, "ceiling": float(np.sqrt(reliability))}


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return (float(values.mean()) if len(values) else float("nan")), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def subset_masks(num_rows: int, count: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """(count, num_rows) uint8 masks, each holding exactly half of the rows, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, num_rows), dtype=np.uint8)
    for m in range(count):
        masks[m, rng.permutation(num_rows)[: num_rows // 2]] = 1
    return masks


def fixed_pairs(count: int, shape: tuple[int, ...], seed: int = PAIRS_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` (timestep, noise) pairs: timesteps stratified over [0, 1000), noise of one latent's ``shape``."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.rand(count, generator=generator, dtype=torch.float64)
    timesteps = ((torch.arange(count, dtype=torch.float64) + offsets) * 1000 / count).long().clamp(0, 999)
    return timesteps, torch.randn((count, *shape), generator=generator)

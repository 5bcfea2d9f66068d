"""The LDS benchmark (benchmarks/lds.py): its maths against scipy and against synthetic data whose answer is known,
and the re-scoring path from the committed retraining data."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from lds_metrics import (ceiling, fixed_pairs, lds, mean_se, seed_agreement, spearman, spearman_brown,  # noqa: E402
                         subset_masks, subset_predictions)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(6, 30)).astype(float)  # many ties
    b = rng.standard_normal((6, 30)) + a
    ours = spearman(a, b)
    for i in range(6):
        assert ours[i] == pytest.approx(spearmanr(a[i], b[i])[0], abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_prediction_is_the_sum_of_the_subsets_scores():
    rng = np.random.default_rng(1)
    scores, masks = rng.standard_normal((3, 10)), subset_masks(10, 4)
    predictions = subset_predictions(scores, masks)
    for q in range(3):
        for m in range(4):
            assert predictions[q, m] == pytest.approx(scores[q, masks[m] == 1].sum())


def test_masks_hold_half_the_rows_and_pairs_are_fixed():
    masks = subset_masks(11, 5)
    assert masks.shape == (5, 11) and (masks.sum(axis=1) == 5).all()
    assert np.array_equal(masks, subset_masks(11, 5))
    t, noise = fixed_pairs(100, (1, 8, 8))
    t2, noise2 = fixed_pairs(100, (1, 8, 8))
    assert (t == t2).all() and (noise == noise2).all() and t.min() >= 0 and t.max() <= 999
    assert np.histogram(t.numpy(), bins=10, range=(0, 1000))[0].tolist() == [10] * 10  # stratified


def synthetic(seeds: int, subsets: int = 3000, rows: int = 40, noise: float = 1.0, seed: int = 0):
    """Losses = -(sum of the subset's true row effects), scaled to unit variance, plus independent seed noise."""
    rng = np.random.default_rng(seed)
    effects = rng.standard_normal((2, rows))  # two queries
    masks = subset_masks(rows, subsets, seed=seed)
    truth = subset_predictions(effects, masks)  # (Q, M)
    truth = (truth - truth.mean(1, keepdims=True)) / truth.std(1, keepdims=True)
    losses = -truth.T[None] + noise * rng.standard_normal((seeds, subsets, 2))
    return effects, masks, losses


def test_ceiling_on_synthetic_data():
    # Two seeds, signal and noise of equal variance: Pearson r = 1/2, Spearman (6/pi) asin(r/2) for normals.
    effects, masks, losses = synthetic(seeds=2)
    expected_r = 6 / np.pi * np.arcsin(0.25)
    assert seed_agreement(losses) == pytest.approx([expected_r] * 2, abs=0.04)
    found = ceiling(losses)
    assert found["spearman_brown"] == pytest.approx(spearman_brown(found["seed_to_seed"], 2))
    # The true effects are the perfect predictor: their LDS against the 2-seed mean reaches the ceiling.
    perfect = lds(effects, masks, losses)
    assert perfect == pytest.approx([found["ceiling"]] * 2, abs=0.04)
    # More seeds raise the ceiling as Spearman-Brown says, and the perfect predictor follows it.
    effects, masks, losses = synthetic(seeds=4, seed=1)
    assert ceiling(losses)["ceiling"] > found["ceiling"] + 0.05
    assert lds(effects, masks, losses) == pytest.approx([ceiling(losses)["ceiling"]] * 2, abs=0.04)
    draws = np.random.default_rng(5).standard_normal((100, *effects.shape))
    assert abs(np.mean([lds(d, masks, losses) for d in draws])) < 0.03  # random scores: 0 in expectation


def test_mean_se():
    mean, error = mean_se(np.array([1.0, 2.0, 3.0, np.nan]))
    assert mean == 2.0 and error == pytest.approx(1 / np.sqrt(3))


@pytest.mark.slow
def test_quick_rescoring_from_the_committed_data(tmp_path):
    import lds

    text = lds.run(quick=True, results_dir=tmp_path, settings=lds.SETTINGS)
    assert (tmp_path / "lds-quick.md").read_text() == text
    for setting, baselines in (("digits", ["pixel cosine"]), ("t2i-lora", ["pixel cosine", "latent cosine"])):
        assert (tmp_path / f"lds-quick-{setting}.json").exists()
        section = text.split(f"## {setting}", 1)[1].split("\n## ", 1)[0]
        assert "### Noise ceiling" in section and "| squared-norm: kernel, λ=0.01·s₁ |" in section
        assert all(f"| {name} |" in section for name in baselines)
    assert lds.report(tmp_path, quick=True) == text  # rebuilt from the JSON alone

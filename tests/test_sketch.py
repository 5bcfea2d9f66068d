"""The compressor: the paper's semantics, streaming, nesting, determinism and fidelity on real gradients."""

import math

import numpy as np
import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers import sketch as sketch_module
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.resolution import resolve_config
from dmin_diffusers.sketch import KeyedPermutation, SketchProjector, fold_sketch
from tiny_models import make_image_dataset, tiny_pipeline


def stream(projector, parts):
    accumulator = projector.new_accumulator()
    for index, part in enumerate(parts):
        projector.accumulate(accumulator, index, part)
    return projector.finalize(accumulator)


@pytest.mark.parametrize("size", [1, 2, 3, 17, 1000, 4096, 5000, 70001])
def test_permutation_is_a_bijection(size):
    positions = KeyedPermutation(size, seed=3)(torch.arange(size))
    assert torch.equal(torch.sort(positions).values, torch.arange(size))
    if size > 16:
        assert not torch.equal(positions, torch.arange(size))


@pytest.mark.parametrize("dim", [1, 8, 64, 1024])
def test_streaming_equals_literal_pad_permute_sign_group_sum(dim):
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 13), (100,), (3, 3, 3, 3), (1,), (257, 5)]
    parts = [torch.randn(shape, generator=generator) for shape in shapes]
    projector = SketchProjector([part.numel() for part in parts], dim, seed=11)
    flat = torch.cat([part.reshape(-1) for part in parts])
    assert projector.padded % dim == 0 and projector.padded - projector.total < dim
    torch.testing.assert_close(stream(projector, parts), projector.literal(flat), rtol=0, atol=1e-4)


def test_literal_steps_by_hand():
    """Spell the four steps out once more: pad, permute, multiply by ±1, sum contiguous groups."""
    gradient = torch.arange(1.0, 11.0)  # D = 10, K = 4 -> padded to 12, groups of 3
    projector = SketchProjector([10], 4, seed=5)
    padded = torch.cat([gradient, torch.zeros(2)])
    permutation = projector.permutation(torch.arange(12))
    permuted = torch.zeros(12)
    permuted[permutation] = padded
    signs = 1 - 2 * projector.signs(torch.arange(12)).float()
    expected = (permuted * signs).reshape(4, 3).sum(1)
    torch.testing.assert_close(stream(projector, [gradient]), expected)
    assert set(signs.tolist()) == {-1.0, 1.0}


def test_folded_sketch_is_the_coarser_nested_sketch():
    generator = torch.Generator().manual_seed(1)
    parts = [torch.randn(300, generator=generator), torch.randn(29, 4, generator=generator)]
    projector = SketchProjector([p.numel() for p in parts], 64, seed=2)
    fine = stream(projector, parts)
    flat = torch.cat([p.reshape(-1) for p in parts])
    padded = torch.zeros(projector.padded)
    padded[: flat.numel()] = flat
    permuted = torch.zeros_like(padded)
    permuted[projector.permutation(torch.arange(projector.padded))] = padded
    signed = permuted * (1 - 2 * projector.signs(torch.arange(projector.padded)).float())
    for coarse in (32, 8, 1):
        expected = signed.reshape(coarse, -1).sum(1)  # the literal method with groups K/coarse times larger
        torch.testing.assert_close(fold_sketch(fine, coarse), expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="cannot fold"):
        fold_sketch(fine, 48)


def test_uncached_chunked_codes_equal_cached_codes(monkeypatch):
    monkeypatch.setattr(sketch_module, "_CODE_CHUNK", 100)
    generator = torch.Generator().manual_seed(2)
    parts = [torch.randn(1234, generator=generator), torch.randn(567, generator=generator)]
    sizes = [p.numel() for p in parts]
    cached = stream(SketchProjector(sizes, 128, seed=4), parts)
    uncached = stream(SketchProjector(sizes, 128, seed=4, code_cache_bytes=0), parts)
    assert torch.equal(cached, uncached)


def test_prepared_codes_are_kept_and_are_the_derived_codes(monkeypatch):
    monkeypatch.setattr(sketch_module, "_CODE_CHUNK", 100)
    sizes = [1234, 567]
    projector = SketchProjector(sizes, 128, seed=4)
    assert projector.prepare_codes("cpu")
    for index, (start, size) in enumerate(zip(projector.offsets, sizes)):
        (kept,) = projector.parameter_codes(index)
        assert kept is projector.parameter_codes(index, torch.device("cpu"))[0]  # kept, not derived again
        assert torch.equal(kept, projector.codes_for_range(start, size))
    over_budget = SketchProjector(sizes, 128, seed=4, code_cache_bytes=0)
    derived = []
    monkeypatch.setattr(over_budget, "codes_for_range", lambda *args: derived.append(args))
    assert not over_budget.prepare_codes("cpu") and not derived  # nothing derived ahead of the gradients
    pieces = SketchProjector(sizes, 128, seed=4, code_cache_bytes=0).parameter_codes(0)  # derived per call
    assert len(pieces) == 13 and torch.equal(torch.cat(pieces), projector.parameter_codes(0)[0])


def test_codes_are_pinned_integers():
    """The bucket and sign of an element depend only on (seed, index), through integer arithmetic: these
    values must never change, or every published index would silently stop matching its queries."""
    projector = SketchProjector([10_000_000], 4096, seed=0)
    codes = projector.codes_for_range(0, 6).tolist()
    assert codes == PINNED_CODES
    late = projector.codes_for_range(9_999_990, 3).tolist()
    assert late == PINNED_LATE_CODES
    assert all(0 <= code < 2 * 4096 for code in codes + late)


PINNED_CODES = [1439, 2851, 4770, 2772, 4926, 1618]
PINNED_LATE_CODES = [1605, 3569, 4291]


def _reference_hash32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_tensor_arithmetic_matches_plain_python_integers():
    """The int64 tensor code splits each 32-bit multiplication to avoid overflow; Python's unbounded
    integers give the reference answer."""
    projector = SketchProjector([10_000_000], 4096, seed=0)
    permutation = projector.permutation
    half, mask = permutation._half, permutation._mask
    indices = [0, 1, 5, 123_456, 9_999_999]
    for index in indices:
        position = index
        while True:
            left, right = position >> half, position & mask
            for key in permutation._keys:
                left, right = right, left ^ (_reference_hash32(right ^ key) & mask)
            position = (left << half) | right
            if position < permutation.size:
                break
        low_key, high_key = projector._sign_keys
        sign = _reference_hash32(_reference_hash32((position & 0xFFFFFFFF) ^ low_key) ^ (position >> 32) ^ high_key) & 1
        expected = (position // projector.group) * 2 + sign
        assert projector.codes_for_range(index, 1).item() == expected


def _reference_code(projector, index):
    """The code of one global index in plain Python integers (no tensors, no numpy)."""
    permutation = projector.permutation
    position = index
    while True:
        left, right = position >> permutation._half, position & permutation._mask
        for key in permutation._keys:
            left, right = right, left ^ (_reference_hash32(right ^ key) & permutation._mask)
        position = (left << permutation._half) | right
        if position < permutation.size:
            break
    low_key, high_key = projector._sign_keys
    sign = _reference_hash32(_reference_hash32((position & 0xFFFFFFFF) ^ low_key) ^ (position >> 32) ^ high_key) & 1
    return (position // projector.group) * 2 + sign


# (sizes, K): padded sizes of odd bit length and just above a power of 4 (most positions walk), exact powers of
# 4 (none walk), one group of 2**32 (uint64 buckets), and more than 2**32 elements (uint64 positions)
BIT_CASES = [([10_000_000], 4096), ([1000, 7, 13], 8), ([70001], 1), ([3], 4), ([1], 1), ([1 << 20], 1024),
             ([(1 << 22) + 5], 64), ([4**9 + 1], 2), ([1 << 32], 1), ([1 << 33, 5], 256)]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 - 1])
@pytest.mark.parametrize("sizes, dim", BIT_CASES)
def test_numpy_derivation_gives_the_bits_of_the_torch_derivation(monkeypatch, sizes, dim, seed):
    """The CPU's numpy kernel (wrapping uint32 arithmetic, blocks, walking deferred across blocks) against the
    int64 torch reference that other devices run, over several ranges, with blocks small enough that the
    deferred walks are flushed part-way."""
    monkeypatch.setattr(sketch_module, "_KERNEL_BLOCK", 256)
    projector = SketchProjector(sizes, dim, seed)
    total = projector.total
    ranges = {(0, min(total, 5000)), (max(total - 3000, 0), min(total, 3000)),
              (total // 3, min(total - total // 3, 777))}
    for start, count in sorted(ranges):
        new = projector.codes_for_range(start, count)
        assert new.dtype == torch.int32 and new.shape == (count,)
        assert torch.equal(new, projector.reference_codes_for_range(start, count)), (start, count)
    sample = np.array(sorted({0, total - 1, total // 2, total // 7}), dtype=np.int64)
    assert projector.codes_at(sample).tolist() == [_reference_code(projector, int(i)) for i in sample]


def test_cpu_permutation_and_signs_give_the_bits_of_the_torch_reference():
    for size, seed in ((70001, 3), (4096, 0), (5000, 9), (2, 1)):
        projector = SketchProjector([size], 1, seed)
        index = torch.arange(size)
        assert torch.equal(projector.permutation(index), projector.permutation._call_torch(index))
        assert torch.equal(projector.signs(index), projector._signs_torch(index))
        assert projector.permutation(index).dtype == projector.signs(index).dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_codes_equal_cpu_codes():
    projector = SketchProjector([(1 << 22) + 5, 1000], 4096, seed=7)
    cpu = projector.codes_for_range(0, projector.total)
    cuda = projector.codes_for_range(0, projector.total, "cuda")
    assert cuda.device.type == "cuda" and torch.equal(cuda.cpu(), cpu)


def test_seed_changes_the_sketch_and_repeats_are_identical():
    vector = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    first = stream(SketchProjector([5000], 256, seed=0), [vector])
    again = stream(SketchProjector([5000], 256, seed=0), [vector])
    other = stream(SketchProjector([5000], 256, seed=1), [vector])
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_inner_products_are_unbiased():
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(3000, generator=generator)
    b = 0.5 * a + torch.randn(3000, generator=generator)
    a, b = a / a.norm(), b / b.norm()
    estimates = torch.tensor(
        [stream(SketchProjector([3000], 64, seed=s), [a]) @ stream(SketchProjector([3000], 64, seed=s), [b])
         for s in range(300)]
    )
    true = float(a @ b)
    # each estimate has a standard deviation of about sqrt((1 + true**2) / K); the mean of 300 of them
    standard_error = math.sqrt((1 + true**2) / 64 / 300)
    assert abs(float(estimates.mean()) - true) < 4 * standard_error
    assert float(estimates.std()) == pytest.approx(math.sqrt((1 + true**2) / 64), rel=0.25)


def test_wrong_sizes_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        SketchProjector([10], 100, seed=0)
    with pytest.raises(ValueError, match="no tracked parameters"):
        SketchProjector([], 64, seed=0)
    projector = SketchProjector([10], 8, seed=0)
    with pytest.raises(ValueError, match="has 11 elements, expected 10"):
        projector.accumulate(projector.new_accumulator(), 0, torch.zeros(11))


def spearman(x, y):
    rank = lambda v: torch.argsort(torch.argsort(v)).double()  # noqa: E731
    return float(torch.corrcoef(torch.stack([rank(x), rank(y)]))[0, 1])


def test_compressed_scores_agree_with_uncompressed_normalised_gradients():
    """Rank agreement of DMin scores with the uncompressed normalised-gradient scores they estimate.

    Bound: for unit vectors a, b a sketch of size K estimates <a, b> with variance about
    (1 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) / K per timestep. Adding that noise (variance e^2) to true scores with
    spread s gives a Pearson correlation r = s / sqrt(s^2 + e^2), and a Spearman correlation of
    (6 / pi) asin(r / 2) for Gaussian scores. The measured Spearman must reach that prediction minus 0.1
    (the sampling error of a correlation over 120 pairs), and the error must be no larger than predicted.
    """
    pipe = tiny_pipeline("ddpm")
    family = detect_family(pipe)
    config = resolve_config(dm.DMinConfig(num_timesteps=4, projection_dim=1024), family)
    sketcher = GradientSketcher(family, config)
    dataset = make_image_dataset(16)
    flat = torch.stack([sketcher.flat_gradients(sketcher.prepare(row["image"], None)) for row in dataset])
    rows, timesteps, size = flat.shape
    upper = torch.triu_indices(rows, rows, offset=1)
    true = torch.einsum("itd,jtd->ij", flat, flat)[upper[0], upper[1]]
    per_timestep = torch.einsum("itd,jtd->ijt", flat, flat)[upper[0], upper[1]]
    squares = flat.square()
    overlap = torch.einsum("itd,jtd->ijt", squares, squares)[upper[0], upper[1]]
    spearmans = {}
    for log_k in (10, 12, 14):
        k = 2**log_k
        projector = SketchProjector([size], k, seed=0)
        sketches = torch.stack(
            [torch.stack([stream(projector, [flat[i, t]]) for t in range(timesteps)]) for i in range(rows)]
        )
        estimate = torch.einsum("itk,jtk->ij", sketches, sketches)[upper[0], upper[1]]
        predicted_error = float(((1 + per_timestep.square() - 2 * overlap).sum(-1) / k).mean().sqrt())
        measured_error = float((estimate - true).square().mean().sqrt())
        r = float(true.std()) / math.sqrt(float(true.var()) + predicted_error**2)
        predicted_spearman = 6 / math.pi * math.asin(r / 2)
        spearmans[k] = spearman(estimate, true)
        print(
            f"K=2^{log_k}: spearman {spearmans[k]:.3f} (predicted {predicted_spearman:.3f}), "
            f"rms error {measured_error:.4f} (predicted {predicted_error:.4f}), score spread {float(true.std()):.4f}"
        )
        assert measured_error < 1.3 * predicted_error
        assert spearmans[k] > predicted_spearman - 0.1
    assert spearmans[2**14] > spearmans[2**10]
    assert spearmans[2**14] > 0.9

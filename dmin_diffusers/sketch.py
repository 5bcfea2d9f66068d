"""The DMin gradient compressor, streamed one parameter tensor at a time.

The paper compresses a flattened gradient ``g`` of length ``D`` to ``K`` numbers: pad ``g`` with zeros to a
multiple of ``K``, permute it with a random permutation ``π``, multiply by a random ±1 vector ``r`` and sum
contiguous groups of ``D_pad / K`` values. Element ``i`` of ``g`` therefore lands in bucket
``π(i) div (D_pad / K)`` with sign ``r[π(i)]``.

Here ``π`` is a keyed Feistel permutation of ``[0, D_pad)`` and ``r`` a keyed hash, both evaluated from
``(seed, global element index)`` with integer arithmetic that gives the same bits on every device. Nothing of
size ``D`` is ever stored on disk, and each parameter's gradient is added to the sketch as soon as autograd
produces it. Because ``D_pad`` is a multiple of ``K`` and the buckets are contiguous ranges of ``π``, the
sketch for ``K / 2`` is the sum of adjacent pairs of the sketch for ``K`` (see :func:`fold_sketch`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)
_MASK32 = 0xFFFFFFFF
_FEISTEL_ROUNDS = 4
# Computing codes for one huge tensor at once would need several int64 temporaries per element.
_CODE_CHUNK = 1 << 22


def _derive_key(seed: int, purpose: str) -> int:
    digest = hashlib.sha256(f"dmin-sketch/{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for int64 ``x < 2**32`` without ever overflowing int64."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xor-shift-multiply) applied elementwise to int64 values below ``2**32``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class KeyedPermutation:
    """A pseudo-random permutation of ``[0, size)`` evaluated pointwise: a balanced Feistel network on the
    smallest even number of bits that covers ``size``, with cycle walking to stay inside the range."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        bits = max(2, (size - 1).bit_length())
        bits += bits % 2
        if bits > 62:
            raise ValueError(f"a permutation of {size} elements is too large for int64 arithmetic")
        self.size = size
        self._half = bits // 2
        self._mask = (1 << self._half) - 1
        self._keys = [_derive_key(seed, f"feistel-{round_}") for round_ in range(_FEISTEL_ROUNDS)]

    def _feistel(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_hash32(right ^ key) & self._mask)
        return (left << self._half) | right

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Maps int64 indices in ``[0, size)`` to their permuted positions."""
        out = self._feistel(index)
        outside = (out >= self.size).nonzero().squeeze(1)
        while outside.numel():
            walked = self._feistel(out[outside])
            out[outside] = walked
            outside = outside[walked >= self.size]
        return out


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: free CUDA memory, or the operating system's
    ``MemAvailable`` on the CPU (2 GiB where neither can be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 31


class SketchProjector:
    """Adds parameter gradients into a ``K``-bucket sketch of their concatenation.

    Args:
        parameter_sizes: number of elements of each tracked parameter, in a fixed order; parameter ``j``
            occupies global indices ``[offset_j, offset_j + size_j)`` of the virtual flattened gradient.
        dim: ``K``, a power of two.
        seed: key of the permutation and the signs.
        code_cache_bytes: the bucket/sign codes of every parameter are kept in memory (4 bytes per element)
            when they fit in this budget, and recomputed on the fly (about 40x slower) otherwise. By default
            the budget is half the memory available on the gradients' device when the codes are first needed.
    """

    def __init__(self, parameter_sizes: Sequence[int], dim: int, seed: int, code_cache_bytes: int | None = None):
        if dim < 1 or dim & (dim - 1):
            raise ValueError(f"the sketch dimension must be a power of two, got {dim}")
        self.parameter_sizes = [int(size) for size in parameter_sizes]
        self.total = sum(self.parameter_sizes)
        if self.total == 0:
            raise ValueError("there are no tracked parameters to sketch")
        self.dim, self.seed = dim, seed
        self.padded = math.ceil(self.total / dim) * dim
        self.group = self.padded // dim
        self.offsets = [0]
        for size in self.parameter_sizes[:-1]:
            self.offsets.append(self.offsets[-1] + size)
        self.permutation = KeyedPermutation(self.padded, seed)
        self._sign_keys = (_derive_key(seed, "sign-low"), _derive_key(seed, "sign-high"))
        self.code_cache_bytes = code_cache_bytes
        self._cache_codes: dict[torch.device, bool] = {}
        self._codes: dict[tuple[int, torch.device], torch.Tensor] = {}

    def signs(self, position: torch.Tensor) -> torch.Tensor:
        """The random ±1 vector ``r`` at permuted positions, as 0 (for +1) or 1 (for -1)."""
        low_key, high_key = self._sign_keys
        mixed = _hash32((position & _MASK32) ^ low_key)
        return _hash32(mixed ^ (position >> 32) ^ high_key) & 1

    def codes_for_range(self, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``2 * bucket + negative`` for global indices ``[start, start + count)``, as int32."""
        index = torch.arange(start, start + count, dtype=torch.int64, device=device)
        position = self.permutation(index)
        return ((position // self.group) * 2 + self.signs(position)).to(torch.int32)

    def _parameter_codes(self, parameter_index: int, device: torch.device) -> list[torch.Tensor]:
        key = (parameter_index, device)
        if key in self._codes:
            return [self._codes[key]]
        start, size = self.offsets[parameter_index], self.parameter_sizes[parameter_index]
        if device not in self._cache_codes:
            budget = available_memory(device) // 2 if self.code_cache_bytes is None else self.code_cache_bytes
            self._cache_codes[device] = 4 * self.total <= budget
            if not self._cache_codes[device]:
                logger.warning(
                    "the compressor's codes (%.2f GiB) exceed the code cache budget (%.2f GiB) on %s: they are "
                    "recomputed for every gradient, about 40x slower; free memory or pass code_cache_bytes",
                    4 * self.total / 2**30, budget / 2**30, device,
                )
        if self._cache_codes[device]:
            self._codes[key] = self.codes_for_range(start, size, device)
            return [self._codes[key]]
        return [
            self.codes_for_range(start + chunk, min(_CODE_CHUNK, size - chunk), device)
            for chunk in range(0, size, _CODE_CHUNK)
        ]

    def new_accumulator(self, device: torch.device | str = "cpu", batch: int | None = None) -> torch.Tensor:
        """A zeroed float32 buffer of ``2 K`` signed buckets (``(batch, 2 K)`` with ``batch``), to pass to
        :meth:`accumulate` (:meth:`accumulate_batch`)."""
        shape = (2 * self.dim,) if batch is None else (batch, 2 * self.dim)
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def accumulate(self, accumulator: torch.Tensor, parameter_index: int, gradient: torch.Tensor) -> None:
        """Adds one parameter's gradient into ``accumulator`` (positive and negative halves kept apart, so
        the signs cost no multiplication pass over the gradient)."""
        self.accumulate_batch(accumulator[None], parameter_index, gradient[None])

    def accumulate_batch(self, accumulators: torch.Tensor, parameter_index: int, gradients: torch.Tensor) -> None:
        """:meth:`accumulate` for a batch: row ``b`` of ``gradients`` (one sample's gradient of the parameter)
        is added into row ``b`` of ``accumulators`` (``(B, 2 K)``, from :meth:`new_accumulator` with ``batch``)."""
        flat = gradients.detach().reshape(gradients.shape[0], -1)
        if flat.shape[1] != self.parameter_sizes[parameter_index]:
            raise ValueError(
                f"gradient of parameter {parameter_index} has {flat.shape[1]} elements, "
                f"expected {self.parameter_sizes[parameter_index]}"
            )
        start = 0
        for codes in self._parameter_codes(parameter_index, flat.device):
            piece = flat[:, start : start + codes.numel()].to(torch.float32)
            for accumulator, gradient in zip(accumulators, piece):  # 2.5x faster than index_add_ along dim 1
                accumulator.index_add_(0, codes, gradient)
            start += codes.numel()

    @staticmethod
    def finalize(accumulator: torch.Tensor) -> torch.Tensor:
        """The ``K``-dimensional sketch from an accumulator (``(..., K)`` from ``(..., 2 K)``)."""
        return accumulator[..., 0::2] - accumulator[..., 1::2]

    def literal(self, flat_gradient: torch.Tensor) -> torch.Tensor:
        """The paper's four steps on a materialised flattened gradient (for tests and baselines only)."""
        padded = torch.zeros(self.padded, dtype=torch.float32, device=flat_gradient.device)
        padded[: self.total] = flat_gradient.to(torch.float32)
        positions = self.permutation(torch.arange(self.padded, device=flat_gradient.device))
        permuted = torch.empty_like(padded)
        permuted[positions] = padded
        random_signs = 1.0 - 2.0 * self.signs(torch.arange(self.padded, device=flat_gradient.device)).float()
        return (permuted * random_signs).reshape(self.dim, self.group).sum(dim=1)


def fold_sketch(sketch: torch.Tensor, dim: int) -> torch.Tensor:
    """Reduces sketches of size ``K`` (last axis) to the nested sketch of size ``dim`` by summing contiguous
    groups of ``K / dim`` buckets; equal to sketching the same gradient at ``dim`` directly."""
    size = sketch.shape[-1]
    if dim < 1 or dim > size or size % dim:
        raise ValueError(f"cannot fold a sketch of size {size} to {dim}")
    return sketch.reshape(*sketch.shape[:-1], dim, size // dim).sum(dim=-1)

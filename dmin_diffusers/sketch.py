"""The DMin gradient compressor, streamed one parameter tensor at a time.

The paper compresses a flattened gradient ``g`` of length ``D`` to ``K`` numbers: pad ``g`` with zeros to a
multiple of ``K``, permute it with a random permutation ``π``, multiply by a random ±1 vector ``r`` and sum
contiguous groups of ``D_pad / K`` values. Element ``i`` of ``g`` therefore lands in bucket
``π(i) div (D_pad / K)`` with sign ``r[π(i)]``.

Here ``π`` is a keyed Feistel permutation of ``[0, D_pad)`` and ``r`` a keyed hash, both evaluated from
``(seed, global element index)`` with integer arithmetic that gives the same bits on every device (numpy's
wrapping uint32 arithmetic on the CPU, int64 torch arithmetic elsewhere). Nothing of size ``D`` is part of an index
(only the codes of large models are cached on disk, in the user's cache directory: :mod:`.code_cache`), and each
parameter's gradient is added to the sketch as soon as autograd produces it. Because ``D_pad`` is a multiple of
``K`` and the buckets are contiguous ranges of ``π``, the sketch for ``K / 2`` is the sum of adjacent pairs of the
sketch for ``K`` (see :func:`fold_sketch`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from . import code_cache

logger = logging.getLogger(__name__)
_MASK32 = 0xFFFFFFFF
_FEISTEL_ROUNDS = 4
_HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
# Computing codes for one huge tensor at once would need several int64 temporaries per element.
_CODE_CHUNK = 1 << 22
# The CPU kernel works on blocks this long, so that its few uint32 buffers stay in the core's cache.
_KERNEL_BLOCK = 1 << 15
# Codes bound for the disk cache are handed to its writer in pieces this long (even).
_STORE_PIECE = 1 << 24


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
    x = _mul32(x, _HASH_MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _HASH_MULTIPLIERS[1])
    return x ^ (x >> 16)


_NP_MULTIPLIERS = tuple(np.uint32(m) for m in _HASH_MULTIPLIERS)


def _hash32_numpy(x: np.ndarray, scratch: np.ndarray, first_shift: bool = True) -> None:
    """:func:`_hash32` in place on a uint32 array (whose multiplication wraps modulo ``2**32`` by itself);
    ``scratch`` is a uint32 buffer of the same length. Without ``first_shift`` the first ``x ^= x >> 16`` is left
    out (the caller folded it into a constant)."""
    if first_shift:
        np.right_shift(x, 16, out=scratch)
        np.bitwise_xor(x, scratch, out=x)
    np.multiply(x, _NP_MULTIPLIERS[0], out=x)
    np.right_shift(x, 15, out=scratch)
    np.bitwise_xor(x, scratch, out=x)
    np.multiply(x, _NP_MULTIPLIERS[1], out=x)
    np.right_shift(x, 16, out=scratch)
    np.bitwise_xor(x, scratch, out=x)


class KeyedPermutation:
    """A pseudo-random permutation of ``[0, size)`` evaluated pointwise: a balanced Feistel network on the
    smallest even number of bits that covers ``size``, with cycle walking to stay inside the range.

    CPU tensors are permuted with numpy's wrapping uint32 arithmetic, other devices with int64 torch arithmetic;
    both give the same bits (the torch code is the reference, :meth:`_call_torch`)."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        bits = max(2, (size - 1).bit_length())
        bits += bits % 2
        if bits > 62:
            raise ValueError(f"a permutation of {size} elements is too large for int64 arithmetic")
        self.size = size
        self.bits = bits
        self._half = bits // 2
        self._mask = (1 << self._half) - 1
        self._keys = [_derive_key(seed, f"feistel-{round_}") for round_ in range(_FEISTEL_ROUNDS)]
        self._np_keys = [np.uint32(key) for key in self._keys]
        self._np_folded_keys = [np.uint32(key ^ (key >> 16)) for key in self._keys]
        # positions fit uint32 up to 32 bits; the halves (at most 31 bits) always do
        self.numpy_dtype = np.uint32 if bits <= 32 else np.uint64

    def _feistel(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_hash32(right ^ key) & self._mask)
        return (left << self._half) | right

    def _call_torch(self, index: torch.Tensor) -> torch.Tensor:
        out = self._feistel(index)
        outside = (out >= self.size).nonzero().squeeze(1)
        while outside.numel():
            walked = self._feistel(out[outside])
            out[outside] = walked
            outside = outside[walked >= self.size]
        return out

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Maps int64 indices in ``[0, size)`` to their permuted positions."""
        if index.device.type != "cpu":
            return self._call_torch(index)
        values = index.detach().numpy().astype(self.numpy_dtype).reshape(-1)
        return torch.from_numpy(self.permute_numpy(values).astype(np.int64)).reshape(index.shape)

    def _rounds_numpy(
        self, left: np.ndarray, right: np.ndarray, scratch: np.ndarray, scratch2: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The Feistel rounds in place on uint32 halves (and two uint32 scratch buffers of the same length);
        returns the buffers that now hold ``(left, right)`` and one that is free."""
        mask = np.uint32(self._mask)
        # below 2**16, (right ^ key) >> 16 is key >> 16: the hash's first xor-shift folds into the key
        folded = self._half <= 16
        for key in self._np_folded_keys if folded else self._np_keys:
            np.bitwise_xor(right, key, out=scratch)
            _hash32_numpy(scratch, scratch2, first_shift=not folded)
            np.bitwise_and(scratch, mask, out=scratch)
            np.bitwise_xor(scratch, left, out=scratch)
            left, right, scratch = right, scratch, left
        return left, right, scratch

    def _feistel_numpy(self, x: np.ndarray) -> np.ndarray:
        left = (x >> self._half).astype(np.uint32)
        right = (x & self._mask).astype(np.uint32)
        left, right, _ = self._rounds_numpy(left, right, np.empty_like(left), np.empty_like(left))
        out = left.astype(self.numpy_dtype)
        np.left_shift(out, self._half, out=out)
        np.bitwise_or(out, right, out=out)
        return out

    def _walk_numpy(self, out: np.ndarray) -> None:
        """Cycle walking in place: positions outside ``[0, size)`` go through the network again."""
        if self.size == 1 << self.bits:
            return
        outside = np.flatnonzero(out >= self.size)
        while outside.size:
            walked = self._feistel_numpy(out[outside])
            out[outside] = walked
            outside = outside[walked >= self.size]

    def permute_numpy(self, index: np.ndarray) -> np.ndarray:
        """:meth:`__call__` on a numpy array of :attr:`numpy_dtype` (uint32 up to ``2**32`` elements, else
        uint64); returns the positions in the same dtype."""
        out = self._feistel_numpy(index)
        self._walk_numpy(out)
        return out


class _CodeKernel32:
    """:meth:`SketchProjector.derive_codes_into` where positions fit uint32: preallocated uint32 buffers of one
    block, every step in place, so that a block never leaves the core's cache."""

    def __init__(self, projector: SketchProjector, block: int):
        self.permutation = projector.permutation
        self.group = np.uint32(projector.group)
        self.keys = tuple(np.uint32(key) for key in projector._sign_keys)
        self.base = np.arange(block, dtype=np.uint32)
        self.buffers = [np.empty(block, dtype=np.uint32) for _ in range(4)]

    def __call__(self, start: int, out: np.ndarray) -> np.ndarray:
        """Writes the codes of ``[start, start + len(out))`` into ``out`` (uint32) and returns the positions of
        one pass of the network, valid until the next call: those outside the range still need walking (their
        codes in ``out`` are wrong until then)."""
        count = out.shape[0]
        permutation = self.permutation
        left, right, scratch, scratch2 = (buffer[:count] for buffer in self.buffers)
        # left, right = index >> half, index & mask, with index = start + arange(count) (below 2**32)
        np.add(self.base[:count], np.uint32(start), out=scratch)
        np.right_shift(scratch, np.uint32(permutation._half), out=left)
        np.bitwise_and(scratch, np.uint32(permutation._mask), out=right)
        left, right, scratch = permutation._rounds_numpy(left, right, scratch, scratch2)
        position = left
        np.left_shift(position, np.uint32(permutation._half), out=position)
        np.bitwise_or(position, right, out=position)
        low_key, high_key = self.keys
        sign = right
        np.bitwise_xor(position, low_key, out=sign)
        _hash32_numpy(sign, scratch)
        np.bitwise_xor(sign, high_key, out=sign)  # position >> 32 is 0
        _hash32_numpy(sign, scratch)
        np.bitwise_and(sign, np.uint32(1), out=sign)
        np.floor_divide(position, self.group, out=scratch)
        np.left_shift(scratch, np.uint32(1), out=scratch)
        np.bitwise_or(scratch, sign, out=out)
        return position


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
            when they fit in this budget, and recomputed on the fly otherwise (on one CPU thread a gradient then
            takes about 3x as long to sketch, the derivation costing 15-35 ns per element). By default
            the budget is half the memory available on the gradients' device when the codes are first needed.
        disk_cache: whether codes kept in CPU memory are read from (and written to) the on-disk cache of
            :mod:`~dmin_diffusers.code_cache`; by default only from
            :data:`~dmin_diffusers.code_cache.MIN_CACHED_ELEMENTS` tracked elements on. Either way the cache
            directory can turn it off (``DMIN_DIFFUSERS_CACHE=off``).
    """

    def __init__(
        self,
        parameter_sizes: Sequence[int],
        dim: int,
        seed: int,
        code_cache_bytes: int | None = None,
        *,
        disk_cache: bool | None = None,
    ):
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
        self.disk_cache = disk_cache
        self._cache_codes: dict[torch.device, bool] = {}
        self._cpu_codes: np.ndarray | None = None  # every element's codes, where the disk cache applies
        self._codes: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._group_codes: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def signs(self, position: torch.Tensor) -> torch.Tensor:
        """The random ±1 vector ``r`` at permuted positions, as 0 (for +1) or 1 (for -1)."""
        if position.device.type != "cpu":
            return self._signs_torch(position)
        values = position.detach().numpy().astype(np.uint64).reshape(-1)
        return torch.from_numpy(self._signs_numpy(values).astype(np.int64)).reshape(position.shape)

    def _signs_torch(self, position: torch.Tensor) -> torch.Tensor:
        low_key, high_key = self._sign_keys
        mixed = _hash32((position & _MASK32) ^ low_key)
        return _hash32(mixed ^ (position >> 32) ^ high_key) & 1

    def _signs_numpy(self, position: np.ndarray) -> np.ndarray:
        """:meth:`signs` of a uint32 or uint64 array, as uint32."""
        low_key, high_key = (np.uint32(key) for key in self._sign_keys)
        mixed = (position & _MASK32).astype(np.uint32)
        scratch = np.empty_like(mixed)
        np.bitwise_xor(mixed, low_key, out=mixed)
        _hash32_numpy(mixed, scratch)
        if position.dtype == np.uint64:
            np.bitwise_xor(mixed, (position >> 32).astype(np.uint32), out=mixed)
        np.bitwise_xor(mixed, high_key, out=mixed)
        _hash32_numpy(mixed, scratch)
        np.bitwise_and(mixed, np.uint32(1), out=mixed)
        return mixed

    def codes_for_range(self, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``2 * bucket + negative`` for global indices ``[start, start + count)``, as int32.

        On the CPU they are derived with numpy (:meth:`derive_codes_into`), elsewhere with torch on the device
        (:meth:`reference_codes_for_range`); the bits are the same."""
        device = torch.device(device)
        if device.type != "cpu":
            return self.reference_codes_for_range(start, count, device)
        out = np.empty(count, dtype=np.int32)
        self.derive_codes_into(start, out)
        return torch.from_numpy(out)

    def reference_codes_for_range(self, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """:meth:`codes_for_range` by the reference derivation, in int64 torch arithmetic on ``device`` (what
        non-CPU devices run; on the CPU, for tests and baselines: the numpy kernel gives the same bits faster)."""
        index = torch.arange(start, start + count, dtype=torch.int64, device=device)
        position = self.permutation._call_torch(index)
        return ((position // self.group) * 2 + self._signs_torch(position)).to(torch.int32)

    def derive_codes_into(self, start: int, out: np.ndarray) -> None:
        """Writes the codes of global indices ``[start, start + len(out))`` into the int32 array ``out``, on the
        CPU, one cache-sized block at a time.

        Positions that the Feistel network sends outside ``[0, padded)`` are collected over blocks and walked
        together, so that cycle walking runs on long arrays rather than on a few elements per block."""
        if out.dtype != np.int32 or out.ndim != 1:
            raise ValueError("out must be a one-dimensional int32 array")
        count = out.shape[0]
        if start < 0 or start + count > self.padded:
            raise ValueError(f"indices [{start}, {start + count}) are outside [0, {self.padded})")
        target = out.view(np.uint32)
        permutation = self.permutation
        walks = permutation.size != 1 << permutation.bits
        kernel = None
        if permutation.numpy_dtype == np.uint32 and self.group < 1 << 32:
            kernel = _CodeKernel32(self, min(_KERNEL_BLOCK, max(count, 1)))
        offsets: list[np.ndarray] = []
        positions: list[np.ndarray] = []
        pending = 0
        for lo in range(0, count, _KERNEL_BLOCK):
            piece = target[lo : lo + _KERNEL_BLOCK]
            if kernel is not None:
                position = kernel(start + lo, piece)
            else:  # more than 2**32 positions: uint64 positions, without preallocated buffers
                index = np.arange(start + lo, start + lo + piece.shape[0], dtype=np.uint64)
                position = permutation._feistel_numpy(index)
                piece[:] = self._codes_of_positions(position)
            if walks:
                outside = np.flatnonzero(position >= permutation.size)
                if outside.shape[0]:
                    offsets.append(outside + lo)
                    positions.append(position[outside])
                    pending += outside.shape[0]
            if pending >= _KERNEL_BLOCK:
                offsets, positions = self._walk_pending(offsets, positions, target, finish=False)
                pending = positions[0].shape[0]
        if pending:
            self._walk_pending(offsets, positions, target, finish=True)

    def _walk_pending(
        self, offsets: list[np.ndarray], positions: list[np.ndarray], target: np.ndarray, finish: bool
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One more pass of the network (every pass with ``finish``) over the positions still outside the range;
        the codes of those that land inside are written at their offsets of ``target``."""
        offset, position = np.concatenate(offsets), np.concatenate(positions)
        while position.shape[0]:
            position = self.permutation._feistel_numpy(position)
            outside = position >= self.permutation.size
            inside = ~outside
            target[offset[inside]] = self._codes_of_positions(position[inside])
            offset, position = offset[outside], position[outside]
            if not finish:
                break
        return [offset], [position]

    def _codes_of_positions(self, position: np.ndarray) -> np.ndarray:
        """``2 * bucket + negative`` of permuted positions (uint32 or uint64), as uint32."""
        if self.group > np.iinfo(position.dtype).max:
            position = position.astype(np.uint64)
        bucket = position // position.dtype.type(self.group)
        codes = (bucket << bucket.dtype.type(1)).astype(np.uint32)
        np.bitwise_or(codes, self._signs_numpy(position), out=codes)
        return codes

    def codes_at(self, index: np.ndarray) -> np.ndarray:
        """The codes (int32) of arbitrary global indices, given as an integer numpy array."""
        position = self.permutation.permute_numpy(np.asarray(index).astype(self.permutation.numpy_dtype))
        return self._codes_of_positions(position).view(np.int32)

    def _uses_disk_cache(self) -> bool:
        enabled = self.total >= code_cache.MIN_CACHED_ELEMENTS if self.disk_cache is None else self.disk_cache
        return enabled and code_cache.code_cache_dir() is not None

    def _all_cpu_codes(self) -> np.ndarray:
        """Every tracked element's codes on the CPU: from the disk cache, or derived and then cached."""
        if self._cpu_codes is None:
            codes = code_cache.load_codes(self)
            if codes is None:
                start = time.perf_counter()
                codes = np.empty(self.total, dtype=np.int32)
                writer = code_cache.open_writer(self)
                try:
                    for lo in range(0, self.total, _STORE_PIECE):  # written while the next piece is derived
                        self.derive_codes_into(lo, codes[lo : lo + _STORE_PIECE])
                        if writer is not None:
                            writer.write(codes[lo : lo + _STORE_PIECE])
                except BaseException:
                    if writer is not None:
                        writer.abort()
                    raise
                if writer is not None:
                    writer.commit()
                logger.info("derived the compressor's codes of %d elements in %.1f s", self.total,
                            time.perf_counter() - start)
            self._cpu_codes = codes
        return self._cpu_codes

    def _keeps_codes(self, device: torch.device) -> bool:
        """Whether every parameter's codes fit the code cache budget on ``device`` (decided, and warned about,
        once per device)."""
        if device not in self._cache_codes:
            budget = available_memory(device) // 2 if self.code_cache_bytes is None else self.code_cache_bytes
            self._cache_codes[device] = 4 * self.total <= budget
            if not self._cache_codes[device]:
                logger.warning(
                    "the compressor's codes (%.2f GiB) exceed the code cache budget (%.2f GiB) on %s: they are "
                    "recomputed for every gradient, several times slower; free memory or pass code_cache_bytes",
                    4 * self.total / 2**30, budget / 2**30, device,
                )
        return self._cache_codes[device]

    def prepare_codes(self, device: torch.device | str = "cpu") -> bool:
        """Derives (or, where :mod:`~dmin_diffusers.code_cache` applies, loads) every parameter's codes on
        ``device`` and keeps them, so that the first gradient sketched does not pay for them; otherwise that
        happens when each parameter is first sketched. Returns whether they are kept: ``False`` when they exceed
        the code cache budget (``code_cache_bytes``), and then nothing is derived (each gradient derives its
        codes as it is sketched)."""
        device = torch.device(device)
        if not self._keeps_codes(device):
            return False
        for index in range(len(self.parameter_sizes)):
            self.parameter_codes(index, device)
        return True

    def parameter_codes(self, parameter_index: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The int32 codes (``2 * bucket + negative``) of one parameter's elements on ``device``: one tensor, kept
        for the next calls, when the codes fit the code cache budget (:meth:`prepare_codes`); else pieces of at
        most 4M elements derived anew for every call."""
        device = torch.device(device)
        key = (parameter_index, device)
        if key in self._codes:
            return [self._codes[key]]
        start, size = self.offsets[parameter_index], self.parameter_sizes[parameter_index]
        if self._keeps_codes(device):
            if device.type == "cpu" and self._uses_disk_cache():
                self._codes[key] = torch.from_numpy(self._all_cpu_codes()[start : start + size])
            else:
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
        self.accumulate_batch_group(accumulators, [parameter_index], [gradients])

    def accumulate_batch_group(
        self, accumulators: torch.Tensor, parameter_indices: list[int], gradients: list[torch.Tensor]
    ) -> None:
        """:meth:`accumulate_batch` of several parameters in one scatter over their concatenated gradients (the
        same sums in the same order: the same bits). A scatter costs about as much per row as 10k elements, so
        small parameters (biases, norms, LoRA matrices) are best added together."""
        flats = [g.detach().reshape(g.shape[0], -1) for g in gradients]
        for index, flat in zip(parameter_indices, flats):
            if flat.shape[1] != self.parameter_sizes[index]:
                raise ValueError(
                    f"gradient of parameter {index} has {flat.shape[1]} elements, expected {self.parameter_sizes[index]}"
                )
        device = accumulators.device
        if len(flats) > 1 and all(len(self.parameter_codes(index, device)) == 1 for index in parameter_indices):
            key = (tuple(parameter_indices), device)
            if key not in self._group_codes:  # kept: the same groups come back for every batch
                self._group_codes[key] = torch.cat([self.parameter_codes(i, device)[0] for i in parameter_indices])
            pieces = [(self._group_codes[key], torch.cat(flats, dim=1))]
        else:
            pieces = []
            for index, flat in zip(parameter_indices, flats):
                start = 0
                for codes in self.parameter_codes(index, device):
                    pieces.append((codes, flat[:, start : start + codes.numel()]))
                    start += codes.numel()
        for codes, piece in pieces:
            piece = piece.to(torch.float32)
            # one scatter for the batch (the index expanded, not copied): 3x faster than an index_add_ per row
            accumulators.scatter_add_(1, codes.long().expand_as(piece), piece)

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

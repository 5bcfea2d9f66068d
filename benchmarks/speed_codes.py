"""Deriving the compressor's codes for full tracking of a large model: the int64 torch derivation (the one before
the numpy kernel, still what non-CPU devices run) against the numpy kernel, and the on-disk code cache
(:mod:`dmin_diffusers.code_cache`): a first run (derive, then write) against a cached run (open, validate).

The default total is Stable Diffusion 1.5's UNet with every parameter tracked (its parameter sizes, from its config
on the meta device: no weights, no download), K = 4096. Times are wall-clock and CPU seconds of this process on
``--threads`` threads; on a shared machine the CPU seconds move less with the load. The torch derivation is timed on
the first parameters up to ``--old-elements`` and extrapolated to the total (labelled so) unless ``--old-full``.
The cache lives in a temporary directory (``--cache-dir`` to choose one, for example on another disk) removed at the
end. The cached run is timed twice: right after the write (the file in the page cache) and after dropping the file
from the page cache (``posix_fadvise(DONTNEED)``: what a process sees after a reboot).

    python benchmarks/speed_codes.py --quick   # 16M elements: ~1 min
    python benchmarks/speed_codes.py           # SD 1.5's UNet (860M elements, 3.2 GiB of codes): ~5 min
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmin_diffusers import code_cache
from dmin_diffusers.sketch import SketchProjector

from common import add_common_arguments, markdown_table, setup_threads, write_report

#: SD 1.5's UNet parameter count, where diffusers cannot build the model
SD15_UNET_PARAMETERS = 859_520_964
QUICK_TOTAL = 1 << 24
DIM = 4096


def sd15_parameter_sizes() -> list[int]:
    """The sizes of SD 1.5's UNet parameters in ``named_parameters`` order (meta tensors: no memory)."""
    try:
        from diffusers import UNet2DConditionModel

        from speed_sd_size import SD15_UNET_CONFIG

        with torch.device("meta"):
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        return [p.numel() for p in unet.parameters()]
    except Exception as error:  # noqa: BLE001 - the benchmark still runs on the known total
        print(f"could not build SD 1.5's UNet on the meta device ({error}); one tensor of {SD15_UNET_PARAMETERS:,}")
        return [SD15_UNET_PARAMETERS]


def scaled_sizes(total: int) -> list[int]:
    """Parameter sizes summing to ``total``: SD 1.5's, cut or repeated."""
    sizes, out = sd15_parameter_sizes(), []
    while sum(out) < total:
        for size in sizes:
            out.append(min(size, total - sum(out)))
            if sum(out) == total:
                break
    return out


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """``(wall seconds, CPU seconds, result)`` of one call of ``fn(*args)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def old_derivation(projector: SketchProjector, limit: int) -> int:
    """The torch derivation the way ``parameter_codes`` ran it (one call per parameter) over the first parameters
    up to ``limit`` elements; returns the number of elements derived."""
    done = 0
    for start, size in zip(projector.offsets, projector.parameter_sizes):
        if done >= limit:
            break
        projector.reference_codes_for_range(start, size)
        done += size
    return done


def all_parameter_codes(projector: SketchProjector) -> None:
    """Every parameter's codes on the CPU, kept by the projector (derived, or read from the disk cache)."""
    if not projector.prepare_codes("cpu"):
        raise RuntimeError("the codes exceed the projector's code cache budget")


def held_codes(projector: SketchProjector, indices: np.ndarray) -> np.ndarray:
    """The codes the projector holds at global element ``indices`` (no new derivation)."""
    owners = np.searchsorted(projector.offsets, indices, side="right") - 1
    return np.array([int(projector.parameter_codes(int(owner))[0][int(index) - projector.offsets[owner]])
                     for owner, index in zip(owners, indices)], dtype=np.int32)


def drop_from_page_cache(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def run(total: int, old_elements: int, cache_dir: Path) -> str:
    sizes = scaled_sizes(total)
    os.environ[code_cache.CACHE_ENV] = str(cache_dir)
    rows = []

    def row(name: str, elements: int, wall: float, cpu: float, note: str = "") -> None:
        rows.append([name, f"{elements:,}", f"{wall:.2f}", f"{cpu:.2f}", f"{cpu / elements * 1e9:.1f}", note])
        print(rows[-1], flush=True)

    projector = SketchProjector(sizes, DIM, seed=0, code_cache_bytes=1 << 62, disk_cache=False)
    wall, cpu, done = timed(old_derivation, projector, old_elements)
    old_rate = cpu / done
    extrapolated = "" if done >= total else f"; {old_rate * total:.0f} CPU s at {total:,} (extrapolated)"
    row("torch int64 (before)", done, wall, cpu, f"one call per parameter{extrapolated}")

    out = np.empty(total, dtype=np.int32)
    wall, cpu, _ = timed(projector.derive_codes_into, 0, out)
    new_rate = cpu / total
    row("numpy uint32 kernel", total, wall, cpu, f"{old_rate / new_rate:.1f}x faster (CPU s per element)")
    check = np.random.default_rng(0).integers(0, total, 1000)
    assert np.array_equal(out[check], projector.codes_at(check))
    del out
    gc.collect()

    first = SketchProjector(sizes, DIM, seed=0, code_cache_bytes=1 << 62, disk_cache=True)
    wall, cpu, _ = timed(all_parameter_codes, first)
    path = code_cache.cache_path(first)
    if not path.exists():
        raise RuntimeError(f"the cache file {path} was not written (see the log)")
    first_wall = wall
    row("first run: derive + write (fsync)", total, wall, cpu, f"{path.stat().st_size / 2**30:.2f} GiB file")
    reference = held_codes(first, check)
    del first
    gc.collect()

    for label, cold in (("cached run: open + validate (file in page cache)", False),
                        ("cached run: open + validate (dropped from page cache)", True)):
        if cold:
            drop_from_page_cache(path)
        cached = SketchProjector(sizes, DIM, seed=0, code_cache_bytes=1 << 62, disk_cache=True)
        cached.derive_codes_into = None  # a derivation would fail: the codes must come from the file
        wall, cpu, _ = timed(all_parameter_codes, cached)
        assert np.array_equal(held_codes(cached, check), reference)
        row(label, total, wall, cpu, f"{first_wall / wall:.0f}x faster than the first run (wall)")
        del cached
        gc.collect()

    header = (
        f"{total:,} elements ({len(sizes)} parameters), K = {DIM}, seed 0, torch threads {torch.get_num_threads()}; "
        f"cache directory {cache_dir}. One run of each. The validation of a cached file reads every code once "
        "(a checksum) and re-derives 258 random ones.\n\n"
    )
    return header + markdown_table(["derivation", "elements", "wall s", "CPU s", "CPU ns / element", "note"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, f"{QUICK_TOTAL:,} elements instead of SD 1.5's UNet")
    parser.add_argument("--total", type=int, default=None, help="tracked elements (default: SD 1.5's UNet)")
    parser.add_argument("--old-elements", type=int, default=None,
                        help="elements of the torch derivation to time (default 2^26, 2^22 with --quick)")
    parser.add_argument("--old-full", action="store_true", help="time the torch derivation on the whole total")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where to put the cache (default: a temp dir)")
    args = parser.parse_args()
    setup_threads(args.threads)
    total = args.total or (QUICK_TOTAL if args.quick else sum(sd15_parameter_sizes()))
    old_elements = total if args.old_full else args.old_elements or (1 << 22 if args.quick else 1 << 26)
    directory = Path(tempfile.mkdtemp(prefix="dmin-codes-", dir=args.cache_dir))
    try:
        body = run(total, old_elements, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    write_report("speed-codes", [("Deriving the compressor's codes, and the disk cache", body)], args.quick,
                 args.results_dir)


if __name__ == "__main__":
    main()

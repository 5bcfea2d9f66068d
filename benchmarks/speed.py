"""Performance of dmin-diffusers, every figure next to a baseline measured in the same process.

1. Compressor throughput (GB/s of float32 gradient consumed) of the streaming sketch, against a plain read of the
   same memory and against the paper's literal recipe (flatten, stored permutation, gather, signs, group sum),
   with peak working memory and persistent state.
2. Caching cost per (row, timestep), one at a time and batched (``GradientSketcher.sketch_many``), each against
   plain forward + backward passes of the same model on the same inputs and batch (ideal: 1.0x).
3. Query latency of exact scoring and HNSW top-10 over N synthetic rows, HNSW recall@10 against exact, index
   build time and bytes per row, the integrity checks' cost, and HNSW build time and memory projected to 1M rows.

    python benchmarks/speed.py --quick      # about a minute on a 2-core laptop
    python benchmarks/speed.py              # the full tables (N up to 100k; several minutes)
    python benchmarks/speed.py --only latency --latency-dim 4096 --latency-sizes 100000 --latency-queries 3
                                            # latency at the package's K = 4096 (an 8 GB store; ~17 min)
    python benchmarks/speed.py --sd-size [--device cuda]   # caching at SD 1.5's size (speed_sd_size.py)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dmin_diffusers as dm
from dmin_diffusers.config import default_knn_dim
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import MAX_BATCH_SAMPLES, GradientSketcher
from dmin_diffusers.knn_projection import KNN_PROJECTION_NAME, fit_projection, load_projection, sample_row_ids
from dmin_diffusers.resolution import resolve_config
from dmin_diffusers.search import KNN_NAME, OVERSAMPLING, KnnIndex, approximate_top_k, exact_top_k
from dmin_diffusers.sketch import SketchProjector
from dmin_diffusers.store import (ROW_DIGEST, VectorStore, VectorStoreWriter, check_file_digest, file_record,
                                  merge_manifests)

from common import (add_common_arguments, best_time, markdown_table, paired_best_times, peak_memory_bytes, plot_path,
                    setup_threads, status_kib, write_report)
from speed_sd_size import plain_steps, sd_size_table
from tiny_models import make_caption_dataset, tiny_pipeline

GB = 1e9
MIB = 2**20
ROWS_PER_CLUSTER = 100  # synthetic rows come in clusters of about this size (like a dataset's subsets)


# --------------------------------------------------------------------------------------------------
# 1. Compressor throughput
# --------------------------------------------------------------------------------------------------


def parameter_sizes(total: int, seed: int = 0) -> list[int]:
    """Splits ``total`` elements into tensors of mixed sizes (4K to 4M), like a model's parameter list."""
    rng = np.random.default_rng(seed)
    sizes, left = [], total
    while left:
        size = min(left, int(2 ** rng.uniform(12, 22)))
        sizes.append(size)
        left -= size
    return sizes


class LiteralCompressor:
    """The paper's recipe as written: a stored random permutation and sign vector (O(D) state), applied to the
    flattened, padded gradient by a gather, a multiply and a group sum."""

    def __init__(self, total: int, dim: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.dim, self.total = dim, total
        self.padded = -(-total // dim) * dim
        self.permutation = torch.randperm(self.padded, generator=generator)
        self.signs = torch.randint(0, 2, (self.padded,), generator=generator).float().mul_(2).sub_(1)

    def __call__(self, gradients: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([g.reshape(-1) for g in gradients])
        padded = F.pad(flat, (0, self.padded - self.total))
        permuted = padded[self.permutation] * self.signs
        return permuted.reshape(self.dim, -1).sum(dim=1)


def compressor_table(total: int, dim: int, repeats: int) -> str:
    sizes = parameter_sizes(total)
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(size, generator=generator) for size in sizes]
    gbytes = 4 * total / GB

    def plain_read() -> None:
        for g in gradients:
            g.sum()

    def streaming(projector: SketchProjector):
        def run() -> torch.Tensor:
            accumulator = projector.new_accumulator()
            squared = torch.zeros(())
            for index, g in enumerate(gradients):
                projector.accumulate(accumulator, index, g)
                squared += torch.linalg.vector_norm(g).square()
            return projector.finalize(accumulator) / squared.sqrt()

        return run

    cached = SketchProjector(sizes, dim, seed=0)
    start = time.perf_counter()
    streaming(cached)()  # derives and caches the bucket/sign codes
    code_setup = time.perf_counter() - start
    uncached = SketchProjector(sizes, dim, seed=0, code_cache_bytes=0)
    start = time.perf_counter()
    literal = LiteralCompressor(total, dim, seed=0)
    literal_setup = time.perf_counter() - start

    methods = [
        ("plain read (sum of every tensor)", plain_read, 0, 0.0),
        ("DMin streaming, codes cached", streaming(cached), 4 * total, code_setup),
        ("DMin streaming, codes recomputed", streaming(uncached), 0, 0.0),
        ("paper literal (flatten, stored perm., gather)", lambda: literal(gradients), 12 * literal.padded,
         literal_setup),
    ]
    rows, base = [], None
    for name, fn, state, setup in methods:
        fn()  # warm-up
        seconds = best_time(fn, repeats)
        peak = peak_memory_bytes(fn)
        base = base or seconds
        rows.append([
            name, f"{seconds * 1e3:.1f}", f"{gbytes / seconds:.2f}", f"{seconds / base:.1f}x",
            "n/a" if peak is None else f"{peak / MIB:.0f}", f"{state / MIB:.0f}", f"{setup:.2f}",
        ])
    assert torch.allclose(cached.finalize(_accumulate_all(cached, gradients)),
                          cached.finalize(_accumulate_all(uncached, gradients)), atol=1e-3)
    header = (f"Gradient of D = {total:,} float32 values ({gbytes * 1e3:.0f} MB) in {len(sizes)} tensors, "
              f"K = {dim}. Time: best of {repeats}.\n\n")
    return header + markdown_table(
        ["method", "time (ms)", "GB/s consumed", "time vs plain read", "peak extra memory (MiB)",
         "persistent state (MiB)", "one-off setup (s)"],
        rows,
    )


def _accumulate_all(projector: SketchProjector, gradients: list[torch.Tensor]) -> torch.Tensor:
    accumulator = projector.new_accumulator()
    for index, g in enumerate(gradients):
        projector.accumulate(accumulator, index, g)
    return accumulator


# --------------------------------------------------------------------------------------------------
# 2. Caching cost per (row, timestep) against a plain training step
# --------------------------------------------------------------------------------------------------


def caching_models(transformers: bool = False) -> list[tuple[str, object, str | None]]:
    """(name, DMin pipeline, prompt) for the tiny UNets of ``tiny_models`` and, with ``transformers``, the tiny SD3
    and Flux transformers."""
    prompt = "a red circle on the left"
    unets = [
        ("tiny SD UNet, LoRA r4 (tracked: LoRA)", tiny_pipeline("sd", dm.DMinStableDiffusionPipeline, lora_rank=4),
         prompt),
        ("tiny SD UNet, full (tracked: all)", tiny_pipeline("sd", dm.DMinStableDiffusionPipeline), prompt),
        ("tiny DDPM UNet 16x16, full", tiny_pipeline("ddpm", dm.DMinDDPMPipeline), None),
    ]
    if not transformers:
        return unets
    return unets + [
        ("tiny SD3 transformer, LoRA r4", tiny_pipeline("sd3", dm.DMinStableDiffusion3Pipeline, lora_rank=4), prompt),
        ("tiny SD3 transformer, full", tiny_pipeline("sd3", dm.DMinStableDiffusion3Pipeline), prompt),
        ("tiny Flux transformer, LoRA r4", tiny_pipeline("flux", dm.DMinFluxPipeline, lora_rank=4), prompt),
        ("tiny Flux transformer, full", tiny_pipeline("flux", dm.DMinFluxPipeline), prompt),
    ]


def _caching_row(name: str, pipe, prompt: str | None, image, num_timesteps: int, dim: int, repeats: int) -> list:
    family = detect_family(pipe)
    fields = {"resolution": 32} if family.name == "flux" else {}  # the tiny Flux generates 32x32
    config = resolve_config(dm.DMinConfig(num_timesteps=num_timesteps, projection_dim=dim, **fields), family)
    per_layer = GradientSketcher(family, config, per_sample="per-layer")
    with_vmap = GradientSketcher(family, config, per_sample="vmap", projector=per_layer.projector)
    examples = [per_layer.prepare(image, prompt)] * max(1, MAX_BATCH_SAMPLES // num_timesteps)
    samples = len(examples) * num_timesteps
    times = {}
    for path, sketcher in (("vmap", with_vmap), ("per layer", per_layer)):
        sketcher.sketch_many(examples)  # warm-up: derives the codes and measures the batch size
        plain, batched = paired_best_times(
            [partial(plain_steps, sketcher, examples, sketcher.batch_samples), partial(sketcher.sketch_many, examples)],
            repeats,
        )
        times[path] = (sketcher.batch_samples, plain / samples, batched / samples)
    plain, sequential = paired_best_times(
        [partial(plain_steps, per_layer, examples[:1], 1), partial(per_layer.sketch_sequential, examples[0])], repeats
    )
    plain, sequential = plain / num_timesteps, sequential / num_timesteps
    row = [name, f"{per_layer.projector.total:,}", f"{plain * 1e3:.1f}", f"{sequential * 1e3:.1f}",
           f"{sequential / plain:.2f}x"]
    for batch, plain_batch, batched in times.values():
        row += [str(batch), f"{plain_batch * 1e3:.1f}", f"{batched * 1e3:.1f}", f"{batched / plain_batch:.2f}x"]
    return row + [f"{sequential / times['per layer'][2]:.2f}x"]


def caching_table(num_timesteps: int, dim: int, repeats: int, transformers: bool) -> str:
    image = make_caption_dataset(1)[0]["image"]
    rows = [_caching_row(*model, image, num_timesteps, dim, repeats) for model in caching_models(transformers)]
    header = (f"T = {num_timesteps} timesteps, K = {dim}; times per (row, timestep), best of {repeats}. The plain "
              "steps are forward + backward passes of the same model, inputs and output function with gradients "
              "accumulated into `.grad` (no optimizer): one sample per pass beside the one-at-a-time path, each "
              "batched path's batch per pass beside it. The batched paths differentiate "
              f"{MAX_BATCH_SAMPLES // num_timesteps} rows' timesteps together (`GradientSketcher.sketch_many`, "
              "default 1 GiB budget): with `torch.func.vmap` (the path before issue 20) and per layer (the default "
              "since).\n\n")
    paths = [h for path in ("vmap", "per layer") for h in (
        f"{path}: batch (samples)", "plain fwd+bwd of the batch (ms)", f"DMin {path} (ms)", f"{path} / plain batch")]
    return header + markdown_table(
        ["model", "tracked params", "plain fwd+bwd, 1 sample (ms)", "DMin one-at-a-time (ms)",
         "one-at-a-time / plain", *paths, "speed-up: one-at-a-time / per layer"],
        rows,
    )


#: the recipe options of ``DMinConfig`` whose cost can differ from the paper's (``benchmarks/quality.py`` grid)
RECIPE_COSTS = {
    "paper (training loss, shared noise)": {},
    "squared-norm output": {"output_function": "squared_norm"},
    "per-timestep noise": {"noise": "per_timestep"},
    "2 noise draws": {"noise_draws": 2},
    "4 noise draws": {"noise_draws": 4},
}


def recipe_cost_table(num_timesteps: int, dim: int, repeats: int) -> str:
    """Caching time per (row, timestep) of each recipe option against the paper's recipe, same model and row."""
    image = make_caption_dataset(1)[0]["image"]
    rows = []
    for name, pipe, prompt in caching_models():
        family = detect_family(pipe)
        times = {}
        for recipe, fields in RECIPE_COSTS.items():
            config = dm.DMinConfig.paper(num_timesteps=num_timesteps, projection_dim=dim, **fields)
            sketcher = GradientSketcher(family, resolve_config(config, family))
            example = sketcher.prepare(image, prompt)
            sketcher.sketch(example)  # warm-up
            times[recipe] = best_time(partial(sketcher.sketch, example), repeats) / num_timesteps
        paper, *others = times.values()
        rows.append([name, f"{paper * 1e3:.1f}"] + [f"{t / paper:.2f}x" for t in others])
    return (f"`GradientSketcher.sketch` per (row, timestep), T = {num_timesteps}, K = {dim}, best of {repeats}, as a "
            "ratio to the paper's recipe on the same model and row.\n\n"
            + markdown_table(["model", "paper recipe (ms)", *list(RECIPE_COSTS)[1:]], rows))


# --------------------------------------------------------------------------------------------------
# 3. Query latency
# --------------------------------------------------------------------------------------------------


def synthetic_rows(count: int, num_timesteps: int, dim: int, centres: torch.Tensor, seed: int) -> torch.Tensor:
    """Clustered rows like real DMin rows: a cluster centre plus noise, L2-normalised per timestep."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(centres), (count,), generator=generator)
    rows = centres[labels] + 0.8 * torch.randn(count, num_timesteps, dim, generator=generator) / dim**0.5
    return torch.nn.functional.normalize(rows, dim=-1).reshape(count, -1)


def write_store(directory: Path, num_rows: int, num_timesteps: int, dim: int, centres: torch.Tensor) -> VectorStore:
    """``num_rows`` synthetic rows in shards of 8,192 rows, generated in chunks of at most 4,096 rows and 256 MiB of
    float32 (an 8 GB store at K = 4096 and 100k rows never holds more than a shard in memory); progress is printed
    for stores over 1 GB."""
    row_dim = num_timesteps * dim
    writer = VectorStoreWriter(directory, row_dim, "float16", shard_size=8192)
    chunk = min(4096, max(256, 2**26 // row_dim))
    verbose, reported, began = num_rows * row_dim * 2 > GB, 0, time.perf_counter()
    for start in range(0, num_rows, chunk):
        rows = synthetic_rows(min(chunk, num_rows - start), num_timesteps, dim, centres, seed=start)
        for offset, row in enumerate(rows):
            writer.add(start + offset, row)
        done = start + len(rows)
        if verbose and (done - reported >= num_rows // 10 or done == num_rows):
            reported = done
            print(f"  wrote {done:,} / {num_rows:,} rows ({done * row_dim * 2 / GB:.1f} GB) "
                  f"[{time.perf_counter() - began:.0f}s]", flush=True)
    writer.flush()
    merge_manifests(directory)
    return VectorStore(directory)


def build_knn(store: VectorStore, num_timesteps: int, dim: int, knn_dim: int) -> KnnIndex:
    """The HNSW index as ``AttributionIndex.build_knn`` makes it by default (principal components fitted on a
    sample of the rows), on the benchmark's one thread."""
    sample = store.get_rows(sample_row_ids(store.row_ids)).reshape(-1, num_timesteps, dim)
    projection = fit_projection(sample, knn_dim, seed=0)
    return KnnIndex.build(store, num_timesteps, knn_dim, projection=projection)


def latency_table(sizes: list[int], num_timesteps: int, dim: int, knn_dim: int, num_queries: int, workdir: Path):
    """The latency table; also returns ``points`` (N, exact ms, HNSW ms) for the plot and ``builds`` (N, HNSW
    build seconds, HNSW file bytes a row, RAM the build added a row or ``None``, store bytes a row) for
    :func:`hnsw_projection`."""
    rows, points, builds = [], [], []
    for n in sizes:
        generator = torch.Generator().manual_seed(n)
        centres = torch.randn(max(n // ROWS_PER_CLUSTER, 1), num_timesteps, dim, generator=generator) / dim**0.5
        queries = synthetic_rows(num_queries, num_timesteps, dim, centres, seed=10**9)
        start = time.perf_counter()
        store = write_store(workdir / f"store-{n}", n, num_timesteps, dim, centres)
        write_seconds = time.perf_counter() - start
        ram_before = status_kib("RssAnon")
        start = time.perf_counter()
        knn = build_knn(store, num_timesteps, dim, knn_dim)
        build_seconds = time.perf_counter() - start
        ram_after = status_kib("RssAnon")
        knn_directory = workdir / f"knn-{n}"
        knn_directory.mkdir()
        knn.save(knn_directory)
        knn_bytes = (knn_directory / KNN_NAME).stat().st_size / n
        added_kib = None if ram_before is None or ram_after is None else max(ram_after - ram_before, 0)
        ram = None if added_kib is None else added_kib * 1024 / n  # bytes per row
        builds.append((n, build_seconds, knn_bytes, ram, store.nbytes / n))
        print(f"N = {n:,}: rows written in {write_seconds:.1f}s, HNSW built in {build_seconds:.1f}s; "
              f"{num_queries} queries...", flush=True)
        exact_times, hnsw_times, recalls = [], [], []
        for query in queries:
            start = time.perf_counter()
            exact, _ = exact_top_k(store, query, 10)
            exact_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            approx, _ = approximate_top_k(knn, store, query, 10, dim)
            hnsw_times.append(time.perf_counter() - start)
            recalls.append(len(set(exact) & set(approx)) / 10)
        del knn
        exact_ms, hnsw_ms = 1e3 * float(np.median(exact_times)), 1e3 * float(np.median(hnsw_times))
        points.append((n, exact_ms, hnsw_ms))
        rows.append([
            f"{n:,}", f"{exact_ms:.1f}", f"{hnsw_ms:.2f}", f"{exact_ms / hnsw_ms:.1f}x", f"{np.mean(recalls):.3f}",
            f"{write_seconds:.1f}", f"{build_seconds:.1f}", f"{store.nbytes / n:,.0f}", f"{knn_bytes:,.0f}",
        ])
    header = (
        f"Synthetic clustered rows (N / {ROWS_PER_CLUSTER} clusters), T = {num_timesteps}, K = {dim} stored as "
        f"float16; the default HNSW index: {knn_dim} principal components per timestep fitted on up to 4,096 rows "
        f"(M = 32, ef_construction = 200, one thread), {OVERSAMPLING * 10} candidates re-ranked exactly on the "
        f"stored rows (`search.approximate_top_k`, as `AttributionIndex.search`). Median over {num_queries} queries "
        f"on one store object (the first query also checks every row's digest). "
        f"HNSW memory is the size of its saved graph + vectors (hnswlib holds the same in RAM); exact scoring "
        f"streams the shards in chunks of 8,192 rows and holds no index in memory.\n\n"
    )
    table = header + markdown_table(
        ["N rows", "exact top-10 (ms)", "HNSW top-10 (ms)", "exact / HNSW", "HNSW recall@10", "write rows (s)",
         "HNSW build (s)", "disk bytes/row", "HNSW bytes/row (RAM)"],
        rows,
    )
    return table, points, builds


def hnsw_projection(builds: list[tuple], target: int = 1_000_000) -> str:
    """HNSW build time and memory at ``target`` rows, extrapolated from the sizes ``latency_table`` measured:
    build time by a least-squares line on log-log axes (its slope is the exponent of N), memory per row as measured
    at the largest N (hnswlib stores each row's vector and level-0 links, a fixed size, plus upper levels for
    about 1 row in M)."""
    fitted = [build for build in builds if build[0] >= 10_000]
    fitted = fitted if len(fitted) >= 2 else builds
    n = np.array([build[0] for build in fitted], dtype=np.float64)
    seconds = np.array([build[1] for build in fitted], dtype=np.float64)
    slope, intercept = np.polyfit(np.log(n), np.log(seconds), 1)
    projected = float(np.exp(intercept) * target**slope)
    largest = max(fitted)
    per_row = largest[1] / largest[0] * target  # what a constant cost per row would give
    rows = []
    for size, build_seconds, knn_bytes, ram, store_bytes in builds:
        rows.append([f"{size:,}", "measured", f"{build_seconds:.1f}", f"{1e3 * build_seconds / size:.2f}",
                     f"{knn_bytes:,.0f}", "n/a" if ram is None else f"{ram:,.0f}",
                     f"{knn_bytes * size / MIB:,.0f}", f"{store_bytes * size / GB:.2f}"])
    ram = largest[3]
    rows.append([f"{target:,}", f"**projection** (N^{slope:.2f})", f"{projected:,.0f} (~{projected / 60:.0f} min)",
                 f"{1e3 * projected / target:.2f}", f"{largest[2]:,.0f}", "n/a" if ram is None else f"{ram:,.0f}",
                 f"{largest[2] * target / MIB:,.0f}", f"{largest[4] * target / GB:.1f}"])
    sizes = ", ".join(f"{build[0]:,}" for build in fitted)
    return (f"A projection, not a measurement: HNSW build time (as `AttributionIndex.build_knn`: sample, principal "
            f"components, stream every row, insert, one thread) fitted as time = c * N^b by least squares on log-log "
            f"axes over N = {sizes}: **b = {slope:.2f}**, giving {projected:,.0f} s at {target:,} rows (a constant "
            f"cost per row at the largest N measured would give {per_row:,.0f} s). Memory per row is taken as "
            f"measured at N = {largest[0]:,} (hnswlib's per-row size does not grow with N): the saved graph + vectors "
            f"(`knn.bin`), and the anonymous RAM the build added (RssAnon after minus before, divided by N; "
            f"includes allocator slack). The store's disk size is the exact scoring's data at that N.\n\n"
            + markdown_table(["N rows", "", "HNSW build (s)", "build ms per row", "knn.bin bytes/row",
                              "RAM added by the build, bytes/row", "knn.bin (MiB)", "store on disk (GB)"], rows))


def integrity_table(sizes: list[int], num_timesteps: int, dim: int, knn_dim: int, workdir: Path) -> str:
    """The cost of the integrity checks on the stores and HNSW files that ``latency_table`` wrote: opening a store,
    the first exact query and the first HNSW query of a freshly opened index (when each shard's sha256 is checked
    once and ``knn.bin``'s at load; every read row is checked for NaN / inf), and a later HNSW query, each with
    the checks and without them (the behaviour before they existed)."""
    rows = []
    for n in sizes:
        directory, knn_path = workdir / f"store-{n}", workdir / f"knn-{n}" / KNN_NAME
        projection_path = knn_path.parent / KNN_PROJECTION_NAME
        query = synthetic_rows(1, num_timesteps, dim, torch.randn(1, num_timesteps, dim), seed=7)[0]
        knn_record, projection_record = file_record(knn_path), file_record(projection_path)
        timings = {}
        for verify in (False, True):
            start = time.perf_counter()
            store = VectorStore(directory, verify=verify)
            opened = time.perf_counter() - start
            start = time.perf_counter()
            exact_top_k(store, query, 10)
            first_exact = time.perf_counter() - start
            # the same store object: digests are checked once, finiteness and zero blocks at every read
            later_exact = best_time(partial(exact_top_k, store, query, 10), 3 if store.nbytes < 2 * GB else 2)
            start = time.perf_counter()
            store = VectorStore(directory, verify=verify)
            if verify:
                check_file_digest(knn_path, knn_record, knn_path.name)
                check_file_digest(projection_path, projection_record, projection_path.name)
            projection = load_projection(projection_path, num_timesteps, dim, knn_dim)
            knn = KnnIndex.load(knn_path, num_timesteps, knn_dim, n, projection)
            approximate_top_k(knn, store, query, 10, dim)
            first_hnsw = time.perf_counter() - start
            later_hnsw = best_time(partial(approximate_top_k, knn, store, query, 10, dim), 5)
            timings[verify] = (opened, first_exact, later_exact, first_hnsw, later_hnsw)
            print(f"N = {n:,}, checks {'on' if verify else 'off'}: "
                  + ", ".join(f"{1e3 * t:.1f} ms" for t in timings[verify]), flush=True)
        cells = [f"{n:,}"]
        for phase in range(5):
            before, after = timings[False][phase], timings[True][phase]
            cells += [f"{1e3 * before:.1f} / {1e3 * after:.1f}", f"{after / before:.2f}x"]
        rows.append(cells)
    phases = ["open store", "first exact query", "later exact query", "first HNSW query (load the HNSW files)",
              "later HNSW query"]
    headers = ["N rows"] + [h for phase in phases for h in (f"{phase}: ms without / with checks", "ratio")]
    return ("Same stores and HNSW files as the latency table (float16 rows of T x K values in shards of 8,192 rows). "
            "Each first query runs on a freshly opened store object (every row read is checked against its "
            f"`{ROW_DIGEST}` digest, and for NaN / inf and zero blocks); a later query runs on the same object "
            "(best of 2-3 for exact, 5 for HNSW). "
            "Opening an `AttributionIndex` also hashes its two small JSON files (config and dataset reference).\n\n"
            + markdown_table(headers, rows))


def plot_latency(points: list[tuple[int, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, exact, hnsw = zip(*points)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.loglog(n, exact, "o-", label="exact (streamed matmul)")
    ax.loglog(n, hnsw, "s-", label="HNSW + exact re-rank")
    ax.set_xlabel("training rows N")
    ax.set_ylabel("top-10 query latency (ms)")
    ax.set_title("Query latency vs N (1 CPU thread)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "small sizes, about a minute")
    parser.add_argument("--only", default="compressor,caching,latency",
                        help="comma-separated sections to run (default all: compressor,caching,latency)")
    parser.add_argument("--sd-size", action="store_true",
                        help="only the caching table at SD 1.5's size (860M parameters; ~30 min on a CPU)")
    parser.add_argument("--device", default="cpu", help="device of the --sd-size table (e.g. cuda)")
    parser.add_argument("--latency-dim", type=int, default=256,
                        help="K of the latency tables' rows (the package default is 4096: 8 GB at 100k rows)")
    parser.add_argument("--latency-sizes", default=None,
                        help="comma-separated N of the latency tables (default 1000,10000,100000; --quick 1000,10000)")
    parser.add_argument("--latency-queries", type=int, default=None,
                        help="queries per N in the latency table (default 20, --quick 10; an exact query at K = 4096 "
                             "and 100k rows reads 8 GB)")
    args = parser.parse_args()
    setup_threads(args.threads)
    if args.sd_size:
        device = args.device
        write_report(f"speed-sd-size-{device.split(':')[0]}", [("Caching cost at Stable Diffusion 1.5's size",
                                                                  sd_size_table(device))], False, args.results_dir)
        return
    quick = args.quick
    chosen = {name.strip() for name in args.only.split(",")}
    sections = []
    start = time.perf_counter()
    if "compressor" in chosen:
        sections.append(("Compressor throughput", compressor_table(2**22 if quick else 2**26, 4096, 2 if quick else 3)))
        print(sections[-1][1], f"\n[{time.perf_counter() - start:.0f}s]", flush=True)
    if "caching" in chosen:
        timesteps, repeats = (4, 2) if quick else (10, 5)
        caching = caching_table(timesteps, 4096, repeats, transformers=not quick)
        sections.append(("Caching cost per (row, timestep)", caching))
        print(sections[-1][1], f"\n[{time.perf_counter() - start:.0f}s]", flush=True)
        sections.append(("Caching cost of the recipe options", recipe_cost_table(timesteps, 4096, repeats)))
        print(sections[-1][1], f"\n[{time.perf_counter() - start:.0f}s]", flush=True)
    if "latency" in chosen:
        default_sizes = [1000, 10000] if quick else [1000, 10000, 100000]
        sizes = [int(size) for size in args.latency_sizes.split(",")] if args.latency_sizes else default_sizes
        dim, knn_dim = args.latency_dim, default_knn_dim(args.latency_dim)
        with tempfile.TemporaryDirectory(prefix="dmin-speed-") as workdir:
            queries = args.latency_queries or (10 if quick else 20)
            table, points, builds = latency_table(sizes, 10, dim, knn_dim, queries, Path(workdir))
            print(table, f"\n[{time.perf_counter() - start:.0f}s]", flush=True)
            integrity = integrity_table(sizes, 10, dim, knn_dim, Path(workdir))
            print(integrity, f"\n[{time.perf_counter() - start:.0f}s]", flush=True)
        sections.append(("Query latency", table))
        sections.append(("Integrity checks: cost on open and on the first query", integrity))
        if len(builds) >= 2:
            sections.append(("HNSW at 1M rows: a projection", hnsw_projection(builds)))
        plot = plot_path("query_latency" + ("" if dim == 256 else f"-k{dim}"), quick, args.results_dir)
        plot_latency(points, plot)
        sections.append(("Plot", f"![query latency]({plot.name}) written to `{plot}`"))
    name = "speed" if chosen >= {"compressor", "caching", "latency"} else "speed-" + "-".join(sorted(chosen))
    name += f"-k{args.latency_dim}" if "latency" in chosen and args.latency_dim != 256 else ""
    write_report(name, sections, quick, args.results_dir)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()

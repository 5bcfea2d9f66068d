"""Cost of the preconditioned scores (``DMinConfig.preconditioning``), each figure beside ``"none"`` measured in the
same run on the same index.

A real index directory is written from synthetic rows made like DMin's (unit rows per timestep that share one
large common direction, in clusters of about 100 rows), then opened as an ``AttributionIndex`` and switched to each
option with ``index.refit`` (no gradient). For each option and N: the fit time (``refit``: the preconditioner and
the HNSW index in its geometry; up to 10k rows the HNSW part timed again alone with ``build_knn``), the bytes of
``preconditioner.safetensors`` beside the stored rows', the exact and the HNSW top-10 query latency (median over the
queries after one warm-up query, and as a ratio to ``"none"``), and the HNSW recall@10 against exact search in the
same geometry.

    python benchmarks/preconditioner_cost.py --quick   # N = 1k, 10k at K = 256: a few minutes on 2 cores
    python benchmarks/preconditioner_cost.py           # N = 1k, 100k at K = 1024 (a 2 GB store; ~30 minutes)
    python benchmarks/preconditioner_cost.py --dim 4096  # the package default K (8 GB of rows at 100k)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import dmin_diffusers as dm
from dmin_diffusers.config import default_knn_dim
from dmin_diffusers.preconditioner import MAX_RANK, PRECONDITIONER_NAME
from dmin_diffusers.search import OVERSAMPLING
from dmin_diffusers.store import VectorStoreWriter, merge_manifests, record_files

from common import add_common_arguments, markdown_table, setup_threads, write_report

OPTIONS = ("none", "centered", "kernel", "centered-kernel")
DAMPING = 0.01
TOP_K = 10
NUM_TIMESTEPS = 10
ROWS_PER_CLUSTER = 100
#: norm of the direction every row shares, of a cluster centre and of a row's own noise, before normalising:
#: rows of different clusters then have a cosine of about 0.7 (0.93 on a tiny SD in full, 0.47 with LoRA)
COMMON, CENTRE, NOISE = 2.0, 1.0, 0.8
#: above this many rows the HNSW rebuild is not timed a second time on its own (minutes at 100k on one thread)
KNN_TIMED_UP_TO = 10_000


@dataclass
class Geometry:
    """The directions the synthetic rows are made of: ``(T, K)`` common direction, ``(C, T, K)`` cluster centres."""

    common: torch.Tensor
    centres: torch.Tensor


def make_geometry(num_rows: int, num_timesteps: int, dim: int, seed: int) -> Geometry:
    generator = torch.Generator().manual_seed(seed)
    common = torch.nn.functional.normalize(torch.randn(num_timesteps, dim, generator=generator), dim=-1)
    clusters = max(num_rows // ROWS_PER_CLUSTER, 1)
    centres = torch.nn.functional.normalize(torch.randn(clusters, num_timesteps, dim, generator=generator), dim=-1)
    return Geometry(COMMON * common, CENTRE * centres)


def synthetic_rows(count: int, geometry: Geometry, seed: int) -> torch.Tensor:
    """``(count, T * K)`` rows: the common direction + a random cluster's centre + noise, unit norm per timestep."""
    generator = torch.Generator().manual_seed(seed)
    num_timesteps, dim = geometry.common.shape
    labels = torch.randint(0, len(geometry.centres), (count,), generator=generator)
    noise = torch.randn(count, num_timesteps, dim, generator=generator) * (NOISE / dim**0.5)
    rows = geometry.common[None] + geometry.centres[labels] + noise
    return torch.nn.functional.normalize(rows, dim=-1).reshape(count, -1)


def write_index(directory: Path, num_rows: int, num_timesteps: int, dim: int, geometry: Geometry):
    """An index directory as a pipeline's build leaves it (rows, manifest, config, dataset reference), opened."""
    writer = VectorStoreWriter(directory, num_timesteps * dim, "float16", shard_size=8192)
    for start in range(0, num_rows, 4096):
        rows = synthetic_rows(min(4096, num_rows - start), geometry, seed=start)
        for offset, row in enumerate(rows):
            writer.add(start + offset, row)
    writer.flush()
    merge_manifests(directory)
    config = dm.DMinConfig(num_timesteps=num_timesteps, projection_dim=dim, knn_dim=default_knn_dim(dim),
                           shard_size=8192)
    (directory / "dmin_config.json").write_text(json.dumps(config.to_dict()))
    dataset = {"num_rows": num_rows, "image_column": "image", "caption_column": None}
    (directory / "dataset.json").write_text(json.dumps(dataset))
    record_files(directory, ["dmin_config.json", "dataset.json"])
    return dm.AttributionIndex(directory)


def mean_cosine(rows: torch.Tensor, num_timesteps: int) -> float:
    """Mean pairwise cosine of rows (``T * K`` values, unit per timestep), the same-row pairs left out."""
    shaped = rows.reshape(len(rows), num_timesteps, -1)
    gram = torch.einsum("ntk,mtk->nm", shaped, shaped) / num_timesteps
    count = len(rows)
    return float((gram.sum() - gram.diagonal().sum()) / (count * (count - 1)))


def timed_searches(index, queries: torch.Tensor, exact: bool) -> tuple[list[float], list[list[int]]]:
    """Seconds and top-10 row ids of each query, after one warm-up query (the first reads check the shards)."""
    index.search(queries[0], TOP_K, exact=exact)
    seconds, found = [], []
    for query in queries[1:]:
        start = time.perf_counter()
        ids, _ = index.search(query, TOP_K, exact=exact)
        seconds.append(time.perf_counter() - start)
        found.append(ids)
    return seconds, found


def measure_option(index, option: str, queries: torch.Tensor, time_knn: bool) -> dict:
    """Fit, storage, latency and recall figures of one option on an open index (``time_knn``: rebuild the HNSW
    index alone once more, to time it)."""
    start = time.perf_counter()
    index.refit(option, DAMPING)
    refit = time.perf_counter() - start
    knn = float("nan")
    if time_knn:
        start = time.perf_counter()
        index.build_knn()  # the HNSW index alone, in the same geometry
        knn = time.perf_counter() - start
    path = index.directory / PRECONDITIONER_NAME
    exact_s, truth = timed_searches(index, queries, exact=True)
    hnsw_s, approx = timed_searches(index, queries, exact=False)
    recalls = np.array([len(set(a) & set(t)) / TOP_K for a, t in zip(approx, truth)])
    return {"option": option, "refit": refit, "knn": knn,
            "bytes": path.stat().st_size if path.exists() else 0, "rows_bytes": index.nbytes,
            "exact_ms": 1e3 * float(np.median(exact_s)), "hnsw_ms": 1e3 * float(np.median(hnsw_s)),
            "exact_iqr": 1e3 * np.subtract(*np.percentile(exact_s, [75, 25])),
            "hnsw_iqr": 1e3 * np.subtract(*np.percentile(hnsw_s, [75, 25])),
            "recall": float(recalls.mean()), "recall_se": float(recalls.std(ddof=1) / len(recalls) ** 0.5)}


def table_rows(num_rows: int, results: list[dict]) -> list[list[str]]:
    base = results[0]
    rows = []
    for r in results:
        size = f"{r['bytes'] / 2**20:,.2f} MiB ({r['bytes'] / r['rows_bytes']:.4f})" if r["bytes"] else "- (0)"
        knn = "-" if np.isnan(r["knn"]) else f"{r['knn']:.1f}"
        rows.append([
            f"{num_rows:,}", r["option"], f"{r['refit']:.1f}", f"{r['refit'] - base['refit']:+.1f}", knn, size,
            f"{r['exact_ms']:.1f} ± {r['exact_iqr'] / 2:.1f}", f"{r['exact_ms'] / base['exact_ms']:.2f}x",
            f"{r['hnsw_ms']:.2f} ± {r['hnsw_iqr'] / 2:.2f}", f"{r['hnsw_ms'] / base['hnsw_ms']:.2f}x",
            f"{r['recall']:.3f} ± {r['recall_se']:.3f}",
        ])
    return rows


def run_size(num_rows: int, dim: int, num_queries: int, workdir: Path, time_knn: bool
             ) -> tuple[list[list[str]], float, float]:
    """The table rows of every option at ``num_rows`` rows, the mean pairwise cosine and the write time."""
    geometry = make_geometry(num_rows, NUM_TIMESTEPS, dim, seed=num_rows)
    queries = synthetic_rows(num_queries + 1, geometry, seed=10**9)
    start = time.perf_counter()
    index = write_index(workdir / f"index-{num_rows}", num_rows, NUM_TIMESTEPS, dim, geometry)
    written = time.perf_counter() - start
    cosine = mean_cosine(synthetic_rows(min(num_rows, 1000), geometry, seed=0), NUM_TIMESTEPS)
    results = []
    for option in OPTIONS:
        results.append(measure_option(index, option, queries, time_knn))
        print(f"  N = {num_rows:,}, {option}: {results[-1]}", flush=True)
    return table_rows(num_rows, results), cosine, written


HEADERS = ["N rows", "preconditioning", "refit (s)", "refit - refit of none (s)", "HNSW rebuild alone (s)",
           "preconditioner.safetensors (/ stored rows)", "exact top-10 (ms)", "exact vs none",
           "HNSW top-10 (ms)", "HNSW vs none", "HNSW recall@10 (± s.e.)"]


def describe(dim: int, num_queries: int, notes: list[str]) -> str:
    return (
        f"Synthetic rows like DMin's: T = {NUM_TIMESTEPS}, K = {dim}, stored as float16 in shards of 8,192 rows; per "
        f"timestep a direction every row shares (norm {COMMON:g}) + one of N / {ROWS_PER_CLUSTER} cluster centres "
        f"(norm {CENTRE:g}) + noise (norm {NOISE:g}), normalised to unit length ({'; '.join(notes)}). "
        f"Each option refitted on the same index directory with `AttributionIndex.refit(option, {DAMPING})` "
        f"(`\"kernel\"` options keep at most {MAX_RANK} eigenpairs per timestep); `refit` = preconditioner fit + "
        "HNSW rebuild in its geometry (the rows mapped into it, PCA fitted there, the graph built) + writing both. "
        "Its excess over `refit(\"none\")` (which rebuilds the same HNSW graph in the plain geometry) is the cost "
        "of the preconditioner: its fit plus mapping the rows; where N <= "
        f"{KNN_TIMED_UP_TO:,} the HNSW rebuild is also timed alone with `build_knn()`. Default HNSW settings: the "
        "config's knn_dim = "
        f"{default_knn_dim(dim)} PCA components per timestep, M = 32, ef_construction = 200, "
        f"{OVERSAMPLING * TOP_K} candidates re-ranked exactly. Latency: median ± half the interquartile range over "
        f"{num_queries} queries (after one warm-up query), one thread; `index.search(q, 10, exact=True)` streams "
        "every stored row, `index.search(q, 10)` asks HNSW. Recall@10: HNSW top-10 against exact top-10 in the same "
        "geometry, mean ± s.e. over the queries.\n\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "N = 1k and 10k at K = 256 (a few minutes)")
    parser.add_argument("--dim", type=int, default=None, help="K of the rows (default 1024; --quick 256)")
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 1000,100000; --quick 1000,10000)")
    parser.add_argument("--queries", type=int, default=20, help="timed queries per option (after one warm-up)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the index directories go (default: tmp)")
    args = parser.parse_args()
    setup_threads(args.threads)
    dim = args.dim or (256 if args.quick else 1024)
    sizes = [int(s) for s in (args.sizes or ("1000,10000" if args.quick else "1000,100000")).split(",")]
    rows, notes = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for num_rows in sizes:
            table, cosine, written = run_size(num_rows, dim, args.queries, Path(workdir), num_rows <= KNN_TIMED_UP_TO)
            rows += table
            notes.append(f"N = {num_rows:,}: mean pairwise row cosine {cosine:.2f}, rows written in {written:.0f} s")
    body = describe(dim, args.queries, notes) + markdown_table(HEADERS, rows)
    write_report("preconditioner-cost", [(f"Fit, storage, latency and recall, K = {dim}", body)], args.quick,
                 args.results_dir)


if __name__ == "__main__":
    main()

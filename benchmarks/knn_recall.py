"""How small the HNSW vectors can be: recall@10 of HNSW + exact re-ranking against exact search, on real DMin rows.

Real rows: the 500 rows and 48 queries (generated images) of the quality benchmark's ``t2i-lora`` setting (the
paper's setting: a pre-trained tiny SD with a fine-tuned LoRA), cached with the default recipe at T = 10,
K = 4096. Two 100k-row sets are built from them: ``mixed`` (each row a real row plus a random fraction of another
real row plus a little noise, so rows differ the way real rows differ) and ``noise`` (200 near copies of each
real row that differ only by isotropic noise: the worst case for any approximate index). For each way of making
the HNSW vectors (``knn_projection="pca"``: per-timestep principal components fitted on 4,096 sampled rows, as
``AttributionIndex.build_knn`` does; ``"fold"``: the nested sketch) and each candidate count, the table gives
recall@10 of HNSW candidates re-ranked exactly on the full rows against exact search, the HNSW build time and
its memory per row.

Then the same is measured in each preconditioned geometry (``DMinConfig.preconditioning``:
``centered``, ``kernel``, ``centered-kernel`` at damping 0.01, beside ``none``) as the package builds it: the
preconditioner fitted from the rows (``Preconditioner.fit``, streamed), rows and queries mapped into its geometry
(``map_rows``, ``map_query``: what ``KnnIndex`` feeds HNSW), the PCA projection fitted on the mapped sample, and
exact search and re-ranking by the preconditioned score (the inner product of the mapped query and row).

    python benchmarks/knn_recall.py            # about 30 minutes on 2 cores (the rows, then the 100k sets)
    python benchmarks/knn_recall.py --quick    # the real rows of a smaller setting only; a few minutes
    python benchmarks/knn_recall.py --preconditioned-only --quick-rows   # the preconditioned geometries alone
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.hnsw import build_hnsw, query_hnsw
from dmin_diffusers.knn_projection import fit_projection, sample_row_ids
from dmin_diffusers.preconditioner import Preconditioner
from dmin_diffusers.resolution import resolve_config
from dmin_diffusers.search import OVERSAMPLING, knn_vectors
import dmin_diffusers as dm

from common import add_common_arguments, markdown_table, setup_threads, write_report

TOP_K = 10
T, K = 10, 4096
CANDIDATES = (10, 20, 40, 80, 160)
#: the package's default graph parameters (what ``build_hnsw`` uses unless told otherwise)
M, EF_CONSTRUCTION = dm.DMinConfig.hnsw_m, dm.DMinConfig.hnsw_ef_construction
#: the geometries of ``--preconditioned`` (``"none"`` measured beside them in the same run) and their damping
GEOMETRIES = ("none", "centered", "kernel", "centered-kernel")
DAMPING = 0.01
#: candidate counts there: the package default (``OVERSAMPLING`` x 10 = 40) and more
PRECONDITIONED_CANDIDATES = (20, 40, 80, 160, 320)


def real_rows(cache: Path, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, queries)``: DMin vectors ``(N, T, K)`` of the t2i-lora setting's rows and query images."""
    if cache.exists():
        tensors = load_file(cache)
        return tensors["rows"].float(), tensors["queries"]
    from quality import FULL, QUICK
    from quality_setups import QUERY_SETS, build_t2i_lora

    setup = build_t2i_lora((QUICK if quick else FULL).sizes)
    family = detect_family(setup.pipe)
    sketcher = GradientSketcher(family, resolve_config(dm.DMinConfig(num_timesteps=T, projection_dim=K), family))
    start = time.perf_counter()
    rows = sketcher.sketch_many(setup.rows)
    print(f"  {len(setup.rows)} rows cached in {time.perf_counter() - start:.0f}s", flush=True)
    queries = sketcher.sketch_many([e for name in QUERY_SETS for e in setup.query_sets[name].examples])
    save_file({"rows": rows.half().contiguous(), "queries": queries.contiguous()}, cache)
    return rows.half().float(), queries


def perturbed_rows(base: torch.Tensor, start: int, stop: int, noise: float) -> torch.Tensor:
    """Rows ``start..stop`` of the large set: base row ``i mod N`` plus seeded noise, renormalised per timestep."""
    out = []
    for i in range(start, stop):
        generator = torch.Generator().manual_seed(i)
        row = base[i % len(base)]
        row = row + noise * torch.randn(row.shape, generator=generator) / row.shape[-1] ** 0.5
        out.append(row / row.norm(dim=-1, keepdim=True))
    return torch.stack(out)


def mixed_rows(base: torch.Tensor, start: int, stop: int, noise: float) -> torch.Tensor:
    """Rows ``start..stop`` of the large set built from pairs: base row ``i mod N`` plus a seeded random weight in
    [0, 1) times another seeded base row, plus noise as :func:`perturbed_rows`, renormalised per timestep."""
    out = []
    for i in range(start, stop):
        generator = torch.Generator().manual_seed(i)
        other = int(torch.randint(len(base), (1,), generator=generator))
        weight = float(torch.rand(1, generator=generator))
        row = base[i % len(base)] + weight * base[other]
        row = row / row.norm(dim=-1, keepdim=True)
        row = row + noise * torch.randn(row.shape, generator=generator) / row.shape[-1] ** 0.5
        out.append(row / row.norm(dim=-1, keepdim=True))
    return torch.stack(out)


#: the HNSW vectors compared: (label, projection "pca" or "fold", values per timestep)
METHODS = [("pca", "pca", 32), ("pca", "pca", 64), ("pca", "pca", 128), ("fold", "fold", 64), ("fold", "fold", 256)]


def method_vectors(rows: torch.Tensor, kind: str, knn_dim: int, projection: torch.Tensor | None) -> np.ndarray:
    flat = rows.reshape(len(rows), -1)
    return knn_vectors(flat, T, knn_dim, projection if kind == "pca" else None)


def one_pass(queries: torch.Tensor, rows_of, num_rows: int, projections: dict, chunk: int = 4096,
             methods=METHODS):
    """Exact top-10 row ids of every query and every method's HNSW vectors, in one pass over the rows."""
    flat_queries = queries.reshape(len(queries), -1)
    best_scores = torch.full((len(queries), 0), -1e9)
    best_ids = torch.zeros((len(queries), 0), dtype=torch.int64)
    vectors = {method: [] for method in methods}
    for start in range(0, num_rows, chunk):
        rows = rows_of(start, min(start + chunk, num_rows))
        scores = torch.cat([best_scores, flat_queries @ rows.reshape(len(rows), -1).T], dim=1)
        ids = torch.cat([best_ids, torch.arange(start, start + len(rows)).expand(len(queries), -1)], dim=1)
        keep = torch.topk(scores, TOP_K, dim=1).indices
        best_scores, best_ids = scores.gather(1, keep), ids.gather(1, keep)
        for method in methods:
            vectors[method].append(method_vectors(rows, method[1], method[2], projections.get(method[2])))
    return best_ids, {method: np.concatenate(parts) for method, parts in vectors.items()}


def build_index(vectors: np.ndarray, threads: int) -> tuple[hnswlib.Index, float]:
    """The package's HNSW graph over ``vectors`` (labels 0..N-1, ``threads`` insertion threads) and its build
    seconds."""
    start = time.perf_counter()
    index = build_hnsw([(np.arange(len(vectors)), vectors)], vectors.shape[1], len(vectors), M, EF_CONSTRUCTION,
                       num_threads=threads)
    return index, time.perf_counter() - start


def recall_cells(index: hnswlib.Index, query_vectors: np.ndarray, queries: torch.Tensor, truth: torch.Tensor,
                 rows_of, candidates=CANDIDATES) -> list[str]:
    """Recall@10 of HNSW candidates re-ranked exactly (and the median HNSW query time) per candidate count."""
    flat_queries = queries.reshape(len(queries), -1)
    cells = []
    for count in candidates:
        count = min(count, index.get_current_count())
        hits, times = 0, []
        for q in range(len(queries)):
            start = time.perf_counter()
            proposed = query_hnsw(index, query_vectors[q : q + 1], count)[0]
            times.append(time.perf_counter() - start)
            rows = torch.cat([rows_of(int(c), int(c) + 1) for c in proposed]).reshape(count, -1)
            found = proposed[torch.topk(rows @ flat_queries[q], TOP_K).indices.numpy()]
            hits += len(set(found.tolist()) & set(truth[q].tolist()))
        cells.append(f"{hits / (TOP_K * len(queries)):.3f} ({np.median(times) * 1e3:.1f} ms)")
    return cells


def table_lines(queries: torch.Tensor, rows_of, num_rows: int, threads: int, stored_bytes: int, methods=METHODS,
                candidates=CANDIDATES) -> list[list[str]]:
    """One line per HNSW method: its name, bytes per row, build time and recall cells (``recall_cells``)."""
    sample = torch.cat([rows_of(i, i + 1) for i in sample_row_ids(np.arange(num_rows))])
    projections = {dim: fit_projection(sample, dim, seed=0) for dim in {d for _, kind, d in methods if kind == "pca"}}
    truth, vectors = one_pass(queries, rows_of, num_rows, projections, methods=methods)
    lines = []
    for method in methods:
        label, kind, knn_dim = method
        index, seconds = build_index(vectors.pop(method), threads)
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "knn.bin")
            index.save_index(path)
            per_row = os.path.getsize(path) / num_rows
        query_vectors = method_vectors(queries, kind, knn_dim, projections.get(knn_dim))
        name = f"{label}, {knn_dim}" + (f" (K/{K // knn_dim})" if kind == "fold" else "")
        lines.append([name, f"{per_row:,.0f} ({per_row / stored_bytes:.3f})", f"{seconds:.1f}"]
                     + recall_cells(index, query_vectors, queries, truth, rows_of, candidates))
        print(lines[-1], flush=True)
    return lines


def table(queries: torch.Tensor, rows_of, num_rows: int, threads: int, stored_bytes: int) -> str:
    lines = table_lines(queries, rows_of, num_rows, threads, stored_bytes)
    return markdown_table(["HNSW vectors, values per timestep", "HNSW bytes/row (/ stored row)", "build (s)"]
                          + [f"recall@10, {c} candidates (ms)" for c in CANDIDATES], lines)


# ------------------------------------------------------------------------------------------------------------
# preconditioned geometries
# ------------------------------------------------------------------------------------------------------------


def fit_geometry(method: str, rows_of, num_rows: int, chunk: int = 4096) -> Preconditioner:
    """The package's preconditioner for ``method``, fitted from the rows streamed in chunks (as from a store)."""
    if method == "none":
        return Preconditioner.identity(T, K)

    def chunks():
        for start in range(0, num_rows, chunk):
            stop = min(start + chunk, num_rows)
            yield torch.arange(start, stop), rows_of(start, stop).reshape(stop - start, T, K)

    return Preconditioner.fit(chunks, method, DAMPING, seed=0)


def mapped_rows(preconditioner: Preconditioner, rows_of, num_rows: int, chunk: int = 4096) -> torch.Tensor:
    """Every row in the preconditioner's geometry, ``(N, T, K)`` float32 (``map_rows``: the HNSW index's input)."""
    parts = []
    for start in range(0, num_rows, chunk):
        stop = min(start + chunk, num_rows)
        rows = rows_of(start, stop).reshape(stop - start, T, K)
        parts.append(rows if preconditioner.is_identity else preconditioner.map_rows(rows, torch.arange(start, stop)))
    return torch.cat(parts)


def geometry_table(queries: torch.Tensor, rows_of, num_rows: int, threads: int, stored_bytes: int,
                   knn_dims: tuple[int, ...]) -> str:
    """Recall@10 in each geometry of ``GEOMETRIES`` with PCA HNSW vectors of ``knn_dims`` values per timestep."""
    methods = [("pca", "pca", d) for d in knn_dims]
    lines = []
    for method in GEOMETRIES:
        start = time.perf_counter()
        preconditioner = fit_geometry(method, rows_of, num_rows)
        fitted = time.perf_counter() - start
        mapped = mapped_rows(preconditioner, rows_of, num_rows)
        mapped_queries = torch.stack([preconditioner.map_query(q) for q in queries])
        print(f"  {method}: fitted in {fitted:.0f}s", flush=True)
        label = method if method == "none" else f"{method} ({DAMPING:g})"
        lines += [[label] + line for line in table_lines(mapped_queries, lambda a, b: mapped[a:b], num_rows, threads,
                                                         stored_bytes, methods, PRECONDITIONED_CANDIDATES)]
        mapped = None  # frees the rows before the next geometry (rebound, not deleted: the lambda reads the name)
    return markdown_table(["preconditioning (damping)", "HNSW vectors, values per timestep",
                           "HNSW bytes/row (/ stored row)", "build (s)"]
                          + [f"recall@10, {c} candidates (ms)" for c in PRECONDITIONED_CANDIDATES], lines)


def preconditioned_sections(rows: torch.Tensor, queries: torch.Tensor, args, stored_bytes: int) -> list:
    """The ``--preconditioned`` sections: the real rows, then (unless ``--quick``) ``--preconditioned-rows`` mixed
    rows built from them."""
    dims = tuple(int(d) for d in args.preconditioned_dims.split(","))
    text = (f"Each geometry as the package builds it (`Preconditioner.fit` at damping {DAMPING:g} streamed over the "
            "rows, rows and queries mapped with `map_rows` / `map_query`, the PCA projection fitted on the mapped "
            "sample of up to 4,096 rows); exact search and re-ranking by the preconditioned score; HNSW M = "
            f"{M}, ef_construction = {EF_CONSTRUCTION}, ef = `hnsw.search_ef(candidates)`. The package default "
            f"is 64 PCA values per timestep and {OVERSAMPLING * TOP_K} candidates. Cells: recall@10 against exact "
            "search in the same geometry (median HNSW query time).\n\n")
    sections = [(f"Preconditioned geometries, real rows ({len(rows)} rows)",
                 f"The {len(rows)} real rows and {len(queries)} queries above. " + text
                 + geometry_table(queries, lambda a, b: rows[a:b], len(rows), args.build_threads, stored_bytes, dims))]
    if not args.quick and args.preconditioned_rows:
        count, noise = args.preconditioned_rows, args.noise / 5
        large = torch.cat([mixed_rows(rows, s, min(s + 4096, count), noise) for s in range(0, count, 4096)])
        sections.append((f"Preconditioned geometries, {count:,} rows built from pairs of real rows",
                         f"Rows built as the mixed set above (relative noise {noise:g}), {count:,} of them. " + text
                         + geometry_table(queries, lambda a, b: large[a:b], count, args.build_threads, stored_bytes,
                                          dims)))
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "the real rows only, a few minutes")
    parser.add_argument("--rows-cache", type=Path, default=None,
                        help="where the real rows are kept between runs (default: in the temporary directory)")
    parser.add_argument("--large-rows", type=int, default=100_000)
    parser.add_argument("--noise", type=float, default=0.5, help="relative noise of the perturbed copies")
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--large-kinds", default="mixed,noise", help="which large sets to build (mixed,noise)")
    parser.add_argument("--preconditioned-only", action="store_true",
                        help="only the preconditioned geometries' tables (to knn-recall-preconditioned[-quick].md)")
    parser.add_argument("--preconditioned-rows", type=int, default=20_000,
                        help="rows of the preconditioned geometries' mixed set (held in memory; 0: real rows only)")
    parser.add_argument("--preconditioned-dims", default="64,128",
                        help="PCA values per timestep of the preconditioned geometries' HNSW vectors")
    parser.add_argument("--quick-rows", action="store_true",
                        help="the real rows of the --quick setting (160 rows, minutes to build) in a full run")
    args = parser.parse_args()
    setup_threads(args.threads)
    quick_rows = args.quick or args.quick_rows
    name = f"dmin-knn-rows{'-quick' if quick_rows else ''}.safetensors"
    cache = args.rows_cache or Path(tempfile.gettempdir()) / name
    rows, queries = real_rows(cache, quick_rows)
    stored_bytes = T * K * 2  # float16 rows
    if args.preconditioned_only:
        write_report("knn-recall-preconditioned", preconditioned_sections(rows, queries, args, stored_bytes),
                     args.quick, args.results_dir)
        return
    sections = []
    real = table(queries, lambda a, b: rows[a:b], len(rows), args.build_threads, stored_bytes)
    sections.append(("Real rows", f"{len(rows)} rows and {len(queries)} queries of the t2i-lora setting, T = {T}, "
                     f"K = {K} (a stored float16 row is {stored_bytes:,} bytes); HNSW M = {M}, ef_construction = "
                     f"{EF_CONSTRUCTION}, ef = `hnsw.search_ef(candidates)` as in the package; candidates re-ranked "
                     "exactly on the full rows. "
                     "Cells: recall@10 against exact search (median HNSW query time).\n\n" + real))
    count = args.large_rows
    builds = {
        "mixed": (mixed_rows, f"{count:,} rows built from pairs of real rows",
                  f"Row i = real row i mod {len(rows)} plus a random weight in [0, 1) times another random real row, "
                  f"plus Gaussian noise of relative norm {args.noise / 5:g}, renormalised per timestep (so rows "
                  "differ the way real rows differ)", args.noise / 5),
        "noise": (perturbed_rows, f"{count:,} rows: near copies that differ only by noise (the worst case)",
                  f"Row i = real row i mod {len(rows)} plus Gaussian noise of relative norm {args.noise} per "
                  f"timestep, renormalised: {count // len(rows)} copies of each real row whose differences are "
                  "isotropic noise", args.noise),
    }
    for kind in ([] if args.quick else args.large_kinds.split(",")):
        make, title, text, noise = builds[kind]
        large = table(queries, lambda a, b: make(rows, a, b, noise), count, args.build_threads, stored_bytes)
        sections.append((title, f"{text}; same queries and settings, HNSW built with {args.build_threads} "
                         "thread(s).\n\n" + large))
    sections += preconditioned_sections(rows, queries, args, stored_bytes)
    write_report("knn-recall", sections, args.quick, args.results_dir)


if __name__ == "__main__":
    main()

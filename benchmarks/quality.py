"""Does DMin find the training rows that shaped an image, and with which recipe? The paper's detection-rate protocol
(section 4.1) at laptop scale, over several seeds, for a grid of recipes; a counterfactual retraining check; and
compression fidelity.

* Settings (``quality_setups.py``): ``t2i-lora``, the paper's and the users' setting (a pre-trained tiny Stable
  Diffusion, LoRA fine-tuned on five drawn subsets, lego < 1 % of the rows); ``t2i`` (the tiny UNet trained in full
  from random initialisation); ``digits`` (an unconditional DDPM on scikit-learn's 8x8 digits).
* Detection rate: the share of a generated query's top-k rows whose label is the query's (its prompt's subset, or
  the digit a classifier reads).
* Methods (rows of the paper's Table 2): random (the expected share), pixel and latent cosine similarity,
  uncompressed gradients with and without normalisation, DMin exact and HNSW at several K. One backward pass per
  (row, timestep) feeds every gradient method (``quality_scores.gradient_scores``).
* Recipes (``RECIPES``): the paper's, and one ``DMinConfig`` option changed at a time (output function, timestep
  spacing, noise), plus a combination. Every recipe runs under ``--seeds`` seeds of the DMin noise and compressor
  key; figures are mean ± std over them.
* No tuning on the reported queries: each setting generates two query sets from disjoint held-out prompts and
  generation seeds. The recipe grid is measured on the *selection* queries; the headline tables use the
  *evaluation* queries.
* Counterfactual (digits): retrain without the top-k rows of the paper's recipe and of the default recipe, and
  without k random rows; how much does the model's loss on the generated image rise?

    python benchmarks/quality.py --quick                    # a few minutes, two recipes
    python benchmarks/quality.py --only t2i-lora            # one setting (results are kept per setting)
    python benchmarks/quality.py --report                   # rebuild the report from the saved results
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

import dmin_diffusers as dm
from dmin_diffusers.config import PAPER_RECIPE, SCORING_FIELDS
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.resolution import resolve_config
from dmin_diffusers.sketch import fold_sketch

from common import RESULTS_DIR, add_common_arguments, markdown_table, setup_threads
from quality_report import write_quality_report
from quality_scores import (Scores, fidelity_table, gradient_scores, method_top_rows, preconditioned_methods,
                            select_queries)
from quality_setups import BUILDERS, QUERY_SETS, Setup, Sizes, train_digits

TOP_KS = (5, 10, 50, 100)
#: changes to the paper's recipe, measured one at a time (and one combination)
RECIPES: dict[str, dict] = {
    "paper": {},
    "squared-norm output": {"output_function": "squared_norm"},
    "linspace timesteps": {"timestep_spacing": "linspace"},
    "cubic timesteps": {"timestep_spacing": "cubic"},
    "per-timestep noise": {"noise": "per_timestep"},
    "4 noise draws": {"noise_draws": 4},
    "squared-norm + linspace + per-timestep noise": {"output_function": "squared_norm",
                                                     "timestep_spacing": "linspace", "noise": "per_timestep"},
}


@dataclass
class Run:
    """What a run measures, besides the model sizes."""

    sizes: Sizes
    num_timesteps: dict[str, int]  # per setting
    dims: tuple[int, ...]  # K of DMin exact (nested sketches: one pass serves all)
    hnsw_dims: tuple[int, ...]
    seeds: int
    recipes: tuple[str, ...]
    counterfactual_images: int
    fidelity_keys: int = 4


QUICK = Run(Sizes(t2i_rows=160, pretrain_rows=300, vae_steps=80, pretrain_steps=150, lora_steps=150, lora_rank=8,
                  t2i_steps=200, prompts_per_subset=2, digit_rows=150, digit_steps=150, digit_queries=4,
                  inference_steps=20, class_rows=8),
            num_timesteps=dict.fromkeys(BUILDERS, 3), dims=(2**10, 2**12), hnsw_dims=(2**10,), seeds=2,
            recipes=("paper", "squared-norm output"), counterfactual_images=1, fidelity_keys=2)
FULL = Run(Sizes(t2i_rows=500, pretrain_rows=2000, vae_steps=800, pretrain_steps=2500, lora_steps=2000, lora_rank=8,
                 t2i_steps=2000, prompts_per_subset=8, digit_rows=400, digit_steps=1200, digit_queries=20,
                 inference_steps=100),
           num_timesteps=dict.fromkeys(BUILDERS, 10), dims=(2**10, 2**12, 2**14),
           hnsw_dims=(2**10, 2**12),
           seeds=3, recipes=tuple(RECIPES), counterfactual_images=3)


def recipe_fields(name: str) -> dict:
    return {**PAPER_RECIPE, **RECIPES[name]}


def default_recipe_name() -> str:
    """The recipe of ``RECIPES`` that ``DMinConfig()`` uses."""
    defaults = dm.DMinConfig()
    for name in RECIPES:  # the preconditioning is scored on every recipe's rows (quality_scores.PRECONDITIONED)
        if all(getattr(defaults, key) == value for key, value in recipe_fields(name).items()
               if key not in SCORING_FIELDS):
            return name
    raise ValueError("DMinConfig's default recipe is not in RECIPES")


def detection_rates(top: torch.Tensor, row_labels: np.ndarray, query_labels: list) -> dict[int, float]:
    """Mean share of the top-k rows whose label is the query's, for every k of ``TOP_KS``."""
    hits = row_labels[top.numpy()] == np.asarray(query_labels, dtype=row_labels.dtype)[:, None]
    return {k: float(hits[:, :k].mean()) for k in TOP_KS}


def query_groups(setup: Setup) -> Iterator[tuple[str, str, list[int]]]:
    """(query set, group, positions of its queries in the set) for every non-empty group of every query set."""
    for name, query_set in setup.query_sets.items():
        for group in setup.groups:
            chosen = [i for i, label in enumerate(query_set.labels) if setup.group_of(label) == group]
            if chosen:
                yield name, group, chosen


def rates_by_group(setup: Setup, top: dict[str, torch.Tensor], offsets: dict[str, slice]) -> dict:
    """query set -> group -> method -> k -> detection rate."""
    out: dict = {name: {} for name in setup.query_sets}
    for name, group, chosen in query_groups(setup):
        labels = [setup.query_sets[name].labels[i] for i in chosen]
        rows = np.asarray(chosen) + offsets[name].start
        out[name][group] = {method: detection_rates(t[rows], setup.row_labels, labels) for method, t in top.items()}
    return out


def self_retrieval(top: dict[str, torch.Tensor], positions: slice, rows: list[int]) -> dict[str, float]:
    """Per method, the share of training rows attributed with their own prompt that rank themselves first."""
    return {method: float((t[positions, 0] == torch.tensor(rows)).float().mean()) for method, t in top.items()}


def baseline_rates(setup: Setup, top_k: int) -> dict:
    """Detection rates of the baselines, which do not depend on the DMin seed: random (the expected share of the
    label among the rows) and the similarity matrices."""
    out: dict = {name: {} for name in setup.query_sets}
    for name, group, chosen in query_groups(setup):
        query_set = setup.query_sets[name]
        labels = [query_set.labels[i] for i in chosen]
        share = float(np.mean([np.mean(setup.row_labels == label) for label in labels]))
        group_rates = {"random selection (expected)": {k: share for k in TOP_KS}}
        for method, similarity in query_set.similarities.items():
            top = torch.topk(similarity[chosen], top_k, dim=1).indices
            group_rates[method] = detection_rates(top, setup.row_labels, labels)
        out[name][group] = group_rates
    return out


def sketched_scores(sketcher: GradientSketcher, rows: list, queries: list, dims: tuple[int, ...]) -> Scores:
    """DMin exact scores at every K of ``dims`` through the package's own path (``GradientSketcher.sketch``) alone:
    the recipe grid needs nothing else, and this costs one backward pass per (row, timestep) and no more."""
    row_sketches = torch.stack([sketcher.sketch(r) for r in rows]).half()
    query_sketches = torch.stack([sketcher.sketch(q) for q in queries])
    methods = {f"DMin exact, K=2^{dim.bit_length() - 1}": torch.einsum(
        "qtk,ntk->qn", fold_sketch(query_sketches, dim), fold_sketch(row_sketches.float(), dim)) for dim in dims}
    return Scores(methods, row_sketches, query_sketches, *(None,) * 5)


def best_recipe(recipes: dict, method: str, top5: int | str = 5) -> str:
    """The recipe with the highest selection-query detection at top-5 (mean over groups and seeds); ``top5`` is
    the key of k = 5 (``"5"`` in results read back from JSON)."""
    def mean_top5(runs: dict) -> float:
        return float(np.mean([g[method][top5] for r in runs.values() for g in r["rates"]["selection"].values()]))

    return max(recipes, key=lambda name: mean_top5(recipes[name]["seeds"]))


def measure(setup: Setup, run: Run) -> tuple[dict, dict]:
    """Every recipe under every seed: detection rates of the DMin methods and seconds per row. The paper's recipe at
    seed 0 goes through the benchmark's uncompressed path too (uncompressed rows, and the fidelity table). Returns
    the results and each recipe's DMin exact scores of the evaluation queries at seed 0 (for the counterfactual)."""
    family = detect_family(setup.pipe)
    queries, offsets, start = [], {}, 0
    self_queries = [setup.rows[n] for n in setup.self_rows]  # each row with its own prompt
    for name, examples in [(name, setup.query_sets[name].examples) for name in QUERY_SETS] + [("self", self_queries)]:
        queries += examples
        offsets[name] = slice(start, start + len(examples))
        start += len(examples)
    top_k = min(max(TOP_KS), len(setup.rows))
    reference = f"DMin exact, K=2^{max(run.dims).bit_length() - 1}"
    num_timesteps = run.num_timesteps[setup.mode]
    results = {"recipes": {}, "baselines": baseline_rates(setup, top_k), "notes": setup.notes,
               "num_timesteps": num_timesteps}
    kept_scores = {}
    for recipe in run.recipes:
        per_seed = {}
        for seed in range(run.seeds):
            config = dm.DMinConfig(num_timesteps=num_timesteps, projection_dim=max(run.dims), seed=seed,
                                   **recipe_fields(recipe))
            sketcher = GradientSketcher(family, resolve_config(config, family))
            full = recipe == "paper" and seed == 0
            began = time.perf_counter()
            if full:
                scores = gradient_scores(sketcher, setup.rows, queries, run.dims, run.fidelity_keys - 1, theory=True)
                results["fidelity"] = {name: fidelity_table(select_queries(scores, list(range(s.start, s.stop))))
                                       for name, s in offsets.items() if name in QUERY_SETS}
            else:
                scores = sketched_scores(sketcher, setup.rows, queries, run.dims)
            seconds = time.perf_counter() - began
            scores.methods.update(preconditioned_methods(scores, min(max(run.dims), dm.DMinConfig().projection_dim)))
            top = method_top_rows(scores, run.hnsw_dims, top_k)
            per_seed[seed] = {"seconds_per_row": None if full else seconds / (len(setup.rows) + len(queries)),
                              "rates": rates_by_group(setup, top, offsets)}
            if self_queries:
                per_seed[seed]["self_retrieval"] = self_retrieval(top, offsets["self"], setup.self_rows)
            if seed == 0:
                kept_scores[recipe] = scores.methods[reference][offsets["evaluation"]]
            mean5 = np.mean([g[reference][5] for g in per_seed[seed]["rates"]["selection"].values()])
            print(f"  {recipe}, seed {seed}: {seconds:.0f}s, selection mean top-5 {mean5:.3f}", flush=True)
        results["recipes"][recipe] = {"fields": recipe_fields(recipe), "seeds": per_seed}
    results["best_recipe"] = best_recipe(results["recipes"], reference)
    return results, kept_scores


# --------------------------------------------------------------------------------------------------
# Counterfactual (digits)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def image_loss(unet, image: torch.Tensor, draws: int = 256, seed: int = 123) -> float:
    """The training loss on one image, averaged over fixed (timestep, noise) draws."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((draws, *image.shape[1:]), generator=generator)
    t = torch.linspace(0, 999, draws).long()
    batch = image.expand(draws, *image.shape[1:])
    return F.mse_loss(unet(scheduler.add_noise(batch, noise, t), t).sample, noise).item()


def counterfactual(setup: Setup, run: Run, kept_scores: dict[str, torch.Tensor]) -> str:
    """Retrain without the top-k rows of each recipe's ranking of an evaluation image, and without k random rows;
    compare how much the loss on the image rises."""
    pixels, steps, seed = setup.digit_pixels, run.sizes.digit_steps, run.sizes.seed
    k = max(5, len(pixels) // 20)
    queries = torch.cat([e.latents for e in setup.query_sets["evaluation"].examples])
    base = train_digits(pixels, np.arange(len(pixels)), steps, seed)
    names = list(kept_scores)

    def rise(removed: set[int], image: torch.Tensor, base_loss: float) -> float:
        keep = np.array([n for n in range(len(pixels)) if n not in removed])
        return image_loss(train_digits(pixels, keep, steps, seed), image) - base_loss

    rows, differences = [], {name: [] for name in names}
    for i in range(run.counterfactual_images):
        image = queries[i:i + 1]
        base_loss = image_loss(base, image)
        random_rise = rise(set(np.random.default_rng([seed, i]).choice(len(pixels), k, replace=False).tolist()),
                           image, base_loss)
        row = [i, f"{base_loss:.4f}", f"{random_rise:+.4f}"]
        for name in names:
            top_rise = rise(set(torch.topk(kept_scores[name][i], k).indices.tolist()), image, base_loss)
            differences[name].append(top_rise - random_rise)
            row.append(f"{top_rise:+.4f}")
        rows.append(row)
        print(f"  counterfactual image {i}: {row}", flush=True)
    table = markdown_table(["image", "base loss", "rise w/o random k"] + [f"rise w/o top-k ({n})" for n in names],
                           rows)
    summary = "".join(
        f"\n- {name}: top-k rise minus random rise {np.mean(d):+.4f} ± {np.std(d):.4f}, positive in "
        f"{int((np.array(d) > 0).sum())}/{len(d)}" for name, d in differences.items())
    return (table + f"\n\nk = {k} of {len(pixels)} rows removed; DMin exact scores at seed 0; loss = MSE on the "
            f"image over 256 fixed (t, noise) draws.{summary}")


def merge_earlier_recipes(results: dict, previous: dict) -> dict:
    """``results`` of a run of some recipes (``--recipes``) with the other recipes of an earlier run of the same
    setting carried over (and said so in the notes), so that re-measuring two recipes keeps the grid."""
    carried = {name: r for name, r in previous["recipes"].items() if name not in results["recipes"]}
    if not carried:
        return results
    results = json.loads(json.dumps(results))  # the keys as the carried recipes have them
    merged = carried | results["recipes"]
    results["recipes"] = {name: merged[name] for name in RECIPES if name in merged}
    reference = f"DMin exact, K=2^{max(results['run']['dims']).bit_length() - 1}"
    results["best_recipe"] = best_recipe(results["recipes"], reference, "5")
    results["notes"].append(f"recipes {', '.join(carried)} carried over from an earlier run of this setting (same "
                            "sizes and seeds, its own trained model); the others re-measured in this run")
    return results


def results_path(mode: str, quick: bool, results_dir: Path | None) -> Path:
    directory = results_dir or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"quality{'-quick' if quick else ''}-{mode}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "small sizes and two recipes, a few minutes")
    parser.add_argument("--only", default=",".join(BUILDERS),
                        help=f"comma-separated settings to run (default all: {','.join(BUILDERS)})")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from saved results")
    parser.add_argument("--seeds", type=int, default=None, help="DMin seeds per recipe (default 3; 2 with --quick)")
    parser.add_argument("--recipes", default=None, help="comma-separated names of RECIPES to run (default all)")
    parser.add_argument("--lora-rank", type=int, default=None, help="t2i-lora: LoRA rank (default 8)")
    parser.add_argument("--lora-steps", type=int, default=None, help="t2i-lora: LoRA fine-tuning steps (default 2000)")
    args = parser.parse_args()
    setup_threads(args.threads)
    run = QUICK if args.quick else FULL
    sizes = {"lora_rank": args.lora_rank, "lora_steps": args.lora_steps}
    run = replace(run, sizes=replace(run.sizes, **{k: v for k, v in sizes.items() if v is not None}))
    if args.seeds is not None:
        run = replace(run, seeds=args.seeds)
    if args.recipes is not None:
        chosen = tuple(name.strip() for name in args.recipes.split(","))
        if set(chosen) - set(RECIPES):
            parser.error(f"unknown recipes {sorted(set(chosen) - set(RECIPES))}; choose from {list(RECIPES)}")
        run = replace(run, recipes=chosen)
    modes = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(BUILDERS)}")
    start = time.perf_counter()
    for mode in [] if args.report else modes:
        print(f"[{time.perf_counter() - start:.0f}s] {mode} ...", flush=True)
        setup = BUILDERS[mode](run.sizes)
        results, kept = measure(setup, run)
        if setup.digit_pixels is not None:
            compared = dict.fromkeys(["paper", results["best_recipe"], default_recipe_name()])
            results["counterfactual"] = counterfactual(setup, run, {name: kept[name] for name in compared})
        results["run"] = asdict(run)
        path = results_path(mode, args.quick, args.results_dir)
        if args.recipes is not None and path.exists():
            results = merge_earlier_recipes(results, json.loads(path.read_text()))
        path.write_text(json.dumps(results, indent=1))
    saved = {mode: json.loads(results_path(mode, args.quick, args.results_dir).read_text())
             for mode in BUILDERS if results_path(mode, args.quick, args.results_dir).exists()}
    write_quality_report(saved, args.quick, args.results_dir, RECIPES, default_recipe_name())
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()

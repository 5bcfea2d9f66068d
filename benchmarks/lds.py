"""The linear datamodeling score (LDS) of every attribution method, D-TRAK's protocol at laptop scale, in the
``digits`` and ``t2i-lora`` settings.

* Retraining (``--retrain``, ``lds_retrain.py``, about an hour per setting on one core): M random 50 % subsets of
  the training rows, one model per (subset, training seed) from the full model's initialisation and recipe, on
  training seeds the full model does not use; each model's output for a query is its diffusion loss averaged over
  fixed (timestep, noise) pairs. What re-scoring needs is committed under ``benchmarks/results/lds/<setting>/``.
* Re-scoring (the default; no retraining): every method's scores of the queries against the training rows under
  the full model. A method's prediction for subset m is the sum of its scores over the rows in it;
  LDS(query) = Spearman over subsets of (prediction, minus the loss averaged over seeds); mean ± s.e. over queries.
  DMin rows are sketched through the package (``GradientSketcher.sketch_many``, stored as float16 as the index
  stores them) and scored through ``dmin_diffusers.preconditioner.Preconditioner`` for every preconditioning.
* Noise ceiling: the seed-to-seed Spearman of the subsets' losses, and its Spearman-Brown correction for the
  seed-averaged target.
* Choices (preconditioning, damping, T x K) are made on the *selection* queries and reported on the *evaluation*
  queries.

    python benchmarks/lds.py --quick               # re-score from the committed data, small (CI), ~3 minutes
    python benchmarks/lds.py                       # re-score in full
    python benchmarks/lds.py --retrain --only digits   # retrain a setting (resumable), then re-score
    python benchmarks/lds.py --report              # rebuild benchmarks/results/lds.md from the JSON
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family, family_named
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.preconditioner import PRECONDITIONINGS, Preconditioner
from dmin_diffusers.resolution import resolve_config

from common import RESULTS_DIR, add_common_arguments, setup_threads
from lds_data import LdsData, load_setting, restrict_queries
from lds_metrics import lds
from lds_report import build_report
from quality import detection_rates

SETTINGS = ("digits", "t2i-lora")
DATA_DIR = RESULTS_DIR / "lds"
RECIPES = {"paper": {"output_function": "loss"}, "squared-norm": {"output_function": "squared_norm"}}
SELF_QUERIES = 20
CACHED_ONLY = False  # --cached-only: score only the (recipe, seed) sketches already in the cache
RANDOM_DRAWS = 5


@dataclass(frozen=True)
class Plan:
    """What a run scores."""

    num_timesteps: int
    dim: int
    seeds: tuple[int, ...]
    dampings: tuple[float, ...]
    queries_per_set: int | None  # None: every query
    timestep_grid: tuple[tuple[int, int], ...]  # (T, K) at fixed storage, measured with each recipe's best option
    grid_seeds: tuple[int, ...] = (0,)
    grid_settings: tuple[str, ...] = ("digits",)  # where the T x K grid is measured


QUICK = Plan(3, 4096, (0,), (1e-2,), 6, ())
FULL = Plan(10, 4096, (0, 1, 2), (1e-3, 1e-2, 1e-1), None, ((20, 2048), (40, 1024)))


def config_for(recipe: str, num_timesteps: int, dim: int, seed: int) -> dm.DMinConfig:
    """The paper's recipe (``DMinConfig.paper``) or today's squared-norm default, at (T, K) and DMin ``seed``."""
    if recipe == "paper":
        return dm.DMinConfig.paper(num_timesteps=num_timesteps, projection_dim=dim, seed=seed)
    return dm.DMinConfig(num_timesteps=num_timesteps, projection_dim=dim, seed=seed, **RECIPES[recipe])


def self_rows(data: LdsData) -> np.ndarray:
    """The training rows used as their own queries (self-retrieval)."""
    return np.sort(np.random.default_rng(0).choice(len(data.rows), SELF_QUERIES, replace=False))


def sketches(data: LdsData, config: dm.DMinConfig, cache: Path | None) -> dict[str, torch.Tensor]:
    """Rows (float16, as stored), queries and the self-retrieval rows as queries (float32), through the package's
    own path; cached under ``cache`` when given (keyed by the model, the recipe and the inputs' count)."""
    family = detect_family(data.pipe)
    digest = hashlib.sha256(json.dumps([data.setup.get("full_model_seconds"), config.output_function,
                                        config.num_timesteps, config.projection_dim, config.seed, len(data.queries),
                                        len(data.rows)]).encode()).hexdigest()[:16]
    path = cache / f"{data.setting}-{digest}.safetensors" if cache else None
    if path is not None and path.exists():
        return load_file(str(path)) | {"key": path.stem}
    if CACHED_ONLY:
        return None
    sketcher = GradientSketcher(family, resolve_config(config, family))
    rows = sketcher.sketch_many(data.rows)
    out = {"rows": rows.half(), "queries": sketcher.sketch_many(data.queries),
           "self": rows[torch.from_numpy(self_rows(data))].float()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in out.items()}, str(path))
        out["key"] = path.stem
    return out


def option_label(method: str, damping: float | None, normalize_rows: bool | None = None) -> str:
    label = method if damping is None else f"{method}, λ={damping:g}·s₁"
    return label + (", rows normalised" if normalize_rows else "")


def options(dampings: tuple[float, ...]) -> list[tuple[str, float | None, bool | None]]:
    """Every preconditioning, the kernels at every damping (the others do not use one) and both with TRAK's
    unnormalised rows and with rows normalised in the preconditioned geometry (None: the method's own behaviour)."""
    out = []
    for method in PRECONDITIONINGS:
        for damping in (None,) if "kernel" not in method else dampings:
            out += [(method, damping, flag) for flag in ((None, True) if damping else (None,))]
    return out


def evaluate(scores: np.ndarray, data: LdsData, self_scores: np.ndarray | None = None) -> dict:
    """Per-query LDS, detection rates per query set (t2i-lora) and self-retrieval of one (Q, N) score matrix."""
    out: dict = {"lds": [float(v) for v in lds(scores, data.masks, data.losses)]}
    if data.setting != "digits":
        top = torch.topk(torch.from_numpy(np.asarray(scores, dtype=np.float32)), min(100, scores.shape[1])).indices
        out["detection"] = {}
        for name, positions in data.query_sets.items():
            rates = detection_rates(top[positions], data.row_labels, [data.query_labels[i] for i in positions])
            out["detection"][name] = {str(k): v for k, v in rates.items() if k in (5, 10)}
    if self_scores is not None:
        out["self_retrieval"] = float(np.mean(self_scores.argmax(axis=1) == self_rows(data)))
    return out


def score_option(sketched: dict, method: str, damping: float | None, normalize_rows: bool | None = None,
                 cache: Path | None = None) -> tuple[np.ndarray, ...]:
    """(queries, rows) and (self queries, rows) scores of one preconditioning fitted on the stored rows."""
    cached = None
    if cache is not None and "key" in sketched:  # the fitted scores too, so new losses re-score in seconds
        cached = cache / f"{sketched['key']}-{method}-{damping}-{normalize_rows}.safetensors"
        if cached.exists():
            saved = load_file(str(cached))
            return saved["scores"].numpy(), saved["self"].numpy()
    rows = sketched["rows"]
    extra = {} if normalize_rows is None else {"normalize_rows": normalize_rows}
    fitted = Preconditioner.fit(rows.float(), method=method, damping=0.01 if damping is None else damping, **extra)
    scores, self_scores = fitted.scores(sketched["queries"], rows), fitted.scores(sketched["self"], rows)
    if cached is not None:
        save_file({"scores": scores.contiguous(), "self": self_scores.contiguous()}, str(cached))
    return scores.numpy(), self_scores.numpy()


def baseline_rows(data: LdsData) -> dict:
    """Random scores (several draws, reported as seeds) and the similarity baselines."""
    shape = (len(data.queries), len(data.rows))
    methods = {"random": {"kind": "baseline", "seeds": {
        str(d): evaluate(np.random.default_rng([d, 99]).standard_normal(shape), data) for d in range(RANDOM_DRAWS)}}}
    for name, similarity in data.baselines.items():
        methods[name] = {"kind": "baseline", "seeds": {"0": evaluate(similarity, data)}}
    return methods


def recipe_rows(data: LdsData, plan: Plan, cache: Path | None, log, recipes: tuple[str, ...]) -> dict:
    """Every (recipe, preconditioning, damping) row at every DMin seed."""
    methods: dict = {}
    for seed in plan.seeds:  # seed-major: a run cut short still has every recipe at seed 0
        for recipe in recipes:
            began = time.perf_counter()
            sketched = sketches(data, config_for(recipe, plan.num_timesteps, plan.dim, seed), cache)
            if sketched is None:
                log(f"{data.setting}: {recipe} seed {seed} not in the cache, skipped (--cached-only)")
                continue
            log(f"{data.setting}: {recipe} seed {seed} sketched in {time.perf_counter() - began:.0f}s")
            for method, damping, normalize_rows in options(plan.dampings):
                scores, self_scores = score_option(sketched, method, damping, normalize_rows, cache)
                entry = methods.setdefault(f"{recipe}: {option_label(method, damping, normalize_rows)}", {
                    "kind": recipe, "option": method, "damping": damping, "normalize_rows": normalize_rows,
                    "T": plan.num_timesteps, "K": plan.dim, "seeds": {}})
                entry["seeds"][str(seed)] = evaluate(scores, data, self_scores)
    return methods


def selection_mean(entry: dict, data_sets: dict[str, list[int]]) -> float:
    """Mean selection-query LDS of a method row, averaged over its seeds."""
    chosen = data_sets["selection"]
    return float(np.mean([np.nanmean(np.asarray(s["lds"])[chosen]) for s in entry["seeds"].values()]))


def best_options(methods: dict, query_sets: dict, recipes: tuple[str, ...]) -> dict[str, str]:
    """Per recipe, the method row with the best selection LDS (the evaluation queries are never looked at)."""
    return {recipe: max((name for name, e in methods.items() if e["kind"] == recipe),
                        key=lambda name: selection_mean(methods[name], query_sets)) for recipe in recipes}


def timestep_rows(data: LdsData, plan: Plan, best: dict[str, str], methods: dict, cache: Path | None, log) -> dict:
    """The best method row (on selection queries, over both recipes) at the other (T, K) of fixed storage T x K."""
    rows: dict = {}
    if data.setting not in plan.grid_settings:
        return rows
    name = max(best.values(), key=lambda n: selection_mean(methods[n], data.query_sets))
    entry, recipe = methods[name], methods[name]["kind"]
    if plan.timestep_grid:
        rows[f"{name}, T×K={entry['T']}×{entry['K']}"] = entry
    for num_timesteps, dim in plan.timestep_grid:
        label = f"{name}, T×K={num_timesteps}×{dim}"
        kept = {k: entry[k] for k in ("kind", "option", "damping", "normalize_rows")}
        rows[label] = {**kept, "T": num_timesteps, "K": dim, "seeds": {}}
        for seed in plan.grid_seeds:
            began = time.perf_counter()
            sketched = sketches(data, config_for(recipe, num_timesteps, dim, seed), cache)
            scores, self_scores = score_option(sketched, entry["option"], entry["damping"], entry["normalize_rows"],
                                               cache)
            rows[label]["seeds"][str(seed)] = evaluate(scores, data, self_scores)
            log(f"{data.setting}: {label} seed {seed} in {time.perf_counter() - began:.0f}s")
    return rows


def default_note(family_name: str) -> str:
    """Which row is what ``DMinConfig()`` gives for a pipeline of ``family_name``."""
    output_function = dm.DMinConfig().output_function
    preconditioning = family_named(family_name).default_preconditioning
    recipe = next(name for name, fields in RECIPES.items() if fields["output_function"] == output_function)
    return (f"DMinConfig()'s default for a {family_name} pipeline: output_function={output_function!r}, "
            f"preconditioning={preconditioning!r} (the row \"{recipe}: {preconditioning}\")")


def notes(family_name: str) -> list[str]:
    """What the reader must know about how the rows were scored."""
    out = [default_note(family_name),
           "every option fitted with Preconditioner.fit on the float16 stored rows, as an index fits it"]
    return out + _row_note()


def _row_note() -> list[str]:
    return ["kernels measured both with TRAK's unnormalised rows and with rows normalised in the preconditioned "
            "geometry (normalize_rows=True)"]


def results_file(setting: str, quick: bool, results_dir: Path | None) -> Path:
    return (results_dir or RESULTS_DIR) / f"lds{'-quick' if quick else ''}-{setting}.json"


def data_dir(setting: str, results_dir: Path | None) -> Path:
    """A setting's retraining data: under ``results_dir/lds`` when it holds it, else the committed one."""
    if results_dir is not None and (results_dir / "lds" / setting / "setup.json").exists():
        return results_dir / "lds" / setting
    return DATA_DIR / setting


def score_setting(setting: str, plan: Plan, results_dir: Path | None, cache: Path | None, log,
                  recipes: tuple[str, ...] = tuple(RECIPES)) -> dict:
    """Re-scores one setting from its retraining data; writes and returns the results."""
    began = time.perf_counter()
    data = load_setting(setting, data_dir(setting, results_dir))
    if plan.queries_per_set is not None:
        data = restrict_queries(data, plan.queries_per_set)
    log(f"{setting}: {len(data.rows)} rows, {data.masks.shape[0]} subsets x {data.losses.shape[0]} seeds, "
        f"{len(data.queries)} queries")
    methods = baseline_rows(data) | recipe_rows(data, plan, cache, log, recipes)
    best = best_options(methods, data.query_sets, recipes)
    grid = timestep_rows(data, plan, best, methods, cache, log)
    results = {"setting": setting, "quick": plan.queries_per_set is not None, "plan": plan.__dict__, "setup": data.setup,
               "query_sets": data.query_sets, "losses": data.losses.tolist(), "masks_count": int(data.masks.shape[0]),
               "methods": methods, "best": best, "timestep_grid": grid, "notes": data.notes + notes(detect_family(data.pipe).name),
               "seconds": time.perf_counter() - began}
    path = results_file(setting, plan.queries_per_set is not None, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return results


def report(results_dir: Path | None = None, quick: bool = False) -> str:
    """The markdown report rebuilt from the saved JSON alone; written to ``lds[-quick].md``."""
    saved = {s: json.loads(results_file(s, quick, results_dir).read_text()) for s in SETTINGS
             if results_file(s, quick, results_dir).exists()}
    text = build_report(saved, quick)
    (results_dir or RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    ((results_dir or RESULTS_DIR) / f"lds{'-quick' if quick else ''}.md").write_text(text)
    return text


def run(quick: bool, results_dir: Path | None, settings=SETTINGS, cache: Path | None = None,
        recipes: tuple[str, ...] = tuple(RECIPES), plan: Plan | None = None) -> str:
    """Re-scores ``settings`` from the retraining data (no retraining) and returns the markdown report. ``cache``:
    a folder keeping the sketches between runs; ``recipes``: a subset of ``RECIPES`` (to split a run); ``plan``:
    instead of ``QUICK`` / ``FULL``."""
    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    for setting in settings:
        if not (data_dir(setting, results_dir) / "losses.safetensors").exists():
            log(f"{setting}: no retraining data in {data_dir(setting, results_dir)}; skipped (run --retrain)")
            continue
        score_setting(setting, plan or (QUICK if quick else FULL), results_dir, cache, log, recipes)
    return report(results_dir, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "re-score with T = 3, one DMin seed, 6 queries per set (about 3 minutes)")
    parser.add_argument("--only", default=",".join(SETTINGS), help=f"comma-separated settings ({','.join(SETTINGS)})")
    parser.add_argument("--retrain", action="store_true", help="retrain the subset models first (resumable)")
    parser.add_argument("--until", default=None, help="with --retrain: stop starting models after HH:MM (UTC)")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the saved JSON")
    parser.add_argument("--cache", type=Path, default=None, help="keep the sketches here between runs")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated recipes ({','.join(RECIPES)})")
    parser.add_argument("--seeds", default=None, help="comma-separated DMin seeds (default 0,1,2; 0 with --quick)")
    parser.add_argument("--no-grid", action="store_true", help="skip the T x K grid")
    parser.add_argument("--cached-only", action="store_true", help="with --cache: skip sketches not in the cache")
    args = parser.parse_args()
    setup_threads(args.threads)
    settings = [s.strip() for s in args.only.split(",") if s.strip()]
    if sorted(set(settings) - set(SETTINGS)):
        parser.error(f"unknown settings {sorted(set(settings) - set(SETTINGS))}; choose from {list(SETTINGS)}")
    if args.report:
        print(report(args.results_dir, args.quick))
        return
    if args.retrain:
        from lds_retrain import retrain, stop_time

        for setting in settings:
            directory = (args.results_dir / "lds" if args.results_dir else DATA_DIR) / setting
            retrain(setting, directory, Path("/tmp/lds-work") / setting, until=stop_time(args.until))
    recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    if set(recipes) - set(RECIPES):
        parser.error(f"unknown recipes {sorted(set(recipes) - set(RECIPES))}; choose from {list(RECIPES)}")
    global CACHED_ONLY
    CACHED_ONLY = args.cached_only
    plan = QUICK if args.quick else FULL
    if args.seeds is not None:
        plan = replace(plan, seeds=tuple(int(v) for v in args.seeds.split(",")))
    if args.no_grid:
        plan = replace(plan, timestep_grid=())
    print(run(args.quick, args.results_dir, settings, args.cache, recipes, plan))


if __name__ == "__main__":
    main()

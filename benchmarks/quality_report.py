"""The quality report: headline detection tables (evaluation queries, mean ± std over seeds), the recipe grid
(selection queries), the choice of the default recipe, the counterfactual, compression fidelity and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common import RESULTS_DIR, markdown_table, plot_path, write_report
from dmin_diffusers.families import family_named
from dmin_diffusers.families.base import LatentFamily
from lds_report import summary_table
from quality_scores import PRECONDITIONED
from quality_setups import SETTING_FAMILIES

HEADLINE_KS = ("5", "10")
REFERENCE_METHOD = "DMin exact, K=2^12"  # the package's default K = 4096


def seed_values(recipe: dict, query_set: str, method: str, k: str, groups: list[str] | None = None) -> np.ndarray:
    """One value per seed that measured ``method``: the detection rate averaged over ``groups`` (default: all)."""
    values = []
    for run in recipe["seeds"].values():
        rates = run["rates"][query_set]
        chosen = groups or list(rates)
        if method in rates[chosen[0]]:
            values.append(np.mean([rates[g][method][k] for g in chosen]))
    return np.asarray(values)


def spread(values: np.ndarray) -> str:
    return f"{values.mean():.3f} ± {values.std():.3f}" if len(values) > 1 else f"{values.mean():.3f} (seed 0)"


def seconds_per_row(recipe: dict) -> float:
    return float(np.mean([r["seconds_per_row"] for r in recipe["seeds"].values() if r["seconds_per_row"]]))


def headline_table(results: dict, default_name: str) -> str:
    """Evaluation queries: baselines, every gradient method of the paper's recipe (the uncompressed ones at seed 0),
    and the DMin methods of the default recipe."""
    paper = results["recipes"]["paper"]
    default = results["recipes"].get(default_name)
    baselines = results["baselines"]["evaluation"]
    groups = list(baselines)
    headers = ["method"] + [f"{g} top-{k}" for g in groups for k in HEADLINE_KS] + [
        f"mean top-{k}" for k in HEADLINE_KS]
    rows = []
    for method in next(iter(baselines.values())):
        cells = [f"{baselines[g][method][k]:.3f}" for g in groups for k in HEADLINE_KS]
        cells += [f"{np.mean([baselines[g][method][k] for g in groups]):.3f}" for k in HEADLINE_KS]
        rows.append([method] + cells)
    labelled = [(f"paper recipe: {m}", paper, m) for m in paper["seeds"]["0"]["rates"]["evaluation"][groups[0]]]
    if default is not None and default is not paper:
        labelled += [(f"default recipe ({default_name}): {m}", default, m)
                     for m in default["seeds"]["0"]["rates"]["evaluation"][groups[0]]]
    for label, recipe, method in labelled:
        cells = [spread(seed_values(recipe, "evaluation", method, k, [g])) for g in groups for k in HEADLINE_KS]
        cells += [spread(seed_values(recipe, "evaluation", method, k)) for k in HEADLINE_KS]
        rows.append([label] + cells)
    return markdown_table(headers, rows)


def self_retrieval_table(results: dict, default_name: str) -> str:
    """Share of the rows attributed with their own prompt that rank themselves first, per method, for the paper's
    recipe and the default one (mean ± std over seeds)."""
    names = list(dict.fromkeys(["paper", default_name]))
    recipes = {name: results["recipes"][name] for name in names if name in results["recipes"]}
    methods = list(next(iter(recipes.values()))["seeds"]["0"]["self_retrieval"])

    def cell(recipe: dict, method: str) -> str:
        values = [run["self_retrieval"][method] for run in recipe["seeds"].values() if method in run["self_retrieval"]]
        return spread(np.asarray(values)) if values else "-"

    rows = [[method] + [cell(recipe, method) for recipe in recipes.values()] for method in methods]
    return markdown_table(["method"] + [f"{name} recipe" for name in recipes], rows)


def verdict(difference: float, spread_of: float) -> str:
    if difference > spread_of:
        return "better"
    if difference < -spread_of:
        return "worse"
    return "within the spread"


def grid_table(results: dict) -> str:
    """Selection queries, DMin exact at K = 4096: every recipe against the paper's, with its cost per row."""
    recipes = results["recipes"]
    paper = recipes.get("paper")
    paper5 = seed_values(paper, "selection", REFERENCE_METHOD, "5") if paper else None
    paper_cost = seconds_per_row(paper) if paper else None
    groups = list(results["baselines"]["selection"])
    rows = []
    for name, recipe in recipes.items():
        top5 = seed_values(recipe, "selection", REFERENCE_METHOD, "5")
        top10 = seed_values(recipe, "selection", REFERENCE_METHOD, "10")
        cost = seconds_per_row(recipe)
        row = [name, spread(top5), spread(top10)]
        row += [spread(seed_values(recipe, "selection", REFERENCE_METHOD, "5", [g])) for g in groups]
        row += [f"{cost:.3f}"]
        if paper5 is not None:
            difference = top5.mean() - paper5.mean()
            row += [f"{cost / paper_cost:.2f}x", f"{difference:+.3f}",
                    "-" if name == "paper" else verdict(difference, max(top5.std(), paper5.std()))]
        rows.append(row)
    headers = ["recipe", "mean top-5", "mean top-10"] + [f"{g} top-5" for g in groups] + ["s / row"]
    if paper5 is not None:
        headers += ["cost vs paper", "Δ mean top-5 vs paper", "vs paper"]
    return markdown_table(headers, rows)


def choice_section(saved: dict, default: str) -> str:
    """Averages each recipe's selection mean top-5 over the settings that ran the whole grid (the most recipes any
    setting ran), and names the best."""
    grid = max((r["recipes"] for r in saved.values()), key=len)
    saved = {mode: r for mode, r in saved.items() if set(grid) <= set(r["recipes"])}
    names = list(grid)
    scores = {n: np.mean([seed_values(r["recipes"][n], "selection", REFERENCE_METHOD, "5") for r in saved.values()],
                         axis=0) for n in names}
    rows = [[n, spread(v)] + [f"{seed_values(r['recipes'][n], 'selection', REFERENCE_METHOD, '5').mean():.3f}"
                              for r in saved.values()] for n, v in scores.items()]
    best = max(scores, key=lambda n: scores[n].mean())
    table = markdown_table(["recipe", "mean over settings"] + [f"{m} mean top-5" for m in saved], rows)
    text = (f"{table}\n\nBest-measured recipe on the selection queries: **{best}**. The package default "
            f"(`DMinConfig()`): **{default}**.")
    if "paper" in scores and best != "paper":
        difference = scores[best].mean() - scores["paper"].mean()
        text += (f" Its lead over the paper's recipe: {difference:+.3f}, against a larger seed standard deviation of "
                 f"{max(scores[best].std(), scores['paper'].std()):.3f}.")
    return text


def preconditioning_choice_section(saved: dict, default: str) -> str:
    """Selection queries, the default recipe's rows at K = 4096: every preconditioning per setting, averaged over
    the settings of each kind of model (pixel or latent, as the family says), against ``"none"``; the best per kind
    and the package's default for it (``PipelineFamily.default_preconditioning``)."""
    methods = {"none": REFERENCE_METHOD} | {name: f"{REFERENCE_METHOD}, {name}" for name in PRECONDITIONED}
    kinds: dict[str, list[str]] = {}
    for mode in saved:
        kind = "latent" if issubclass(family_named(SETTING_FAMILIES[mode]), LatentFamily) else "pixel"
        kinds.setdefault(kind, []).append(mode)
    rows, lines = [], []
    for kind, modes in kinds.items():
        values = {name: {mode: seed_values(saved[mode]["recipes"][default], "selection", method, "5")
                         for mode in modes} for name, method in methods.items()}
        for name, per_mode in values.items():
            cells = []
            for mode in saved:
                if mode not in per_mode:
                    cells.append("")
                    continue
                base = values["none"][mode]
                difference, spread_of = per_mode[mode].mean() - base.mean(), max(per_mode[mode].std(), base.std())
                mark = "" if name == "none" else f" ({verdict(difference, spread_of)})"
                cells.append(spread(per_mode[mode]) + mark)
            rows.append([kind, name] + cells + [f"{np.mean([v.mean() for v in per_mode.values()]):.3f}"])
        best = max(values, key=lambda name: np.mean([v.mean() for v in values[name].values()]))
        chosen = sorted({family_named(SETTING_FAMILIES[mode]).default_preconditioning for mode in modes})
        lines.append(f"- {kind} models ({', '.join(modes)}): best mean **{best}**; the package's default for their "
                     f"families: **{', '.join(chosen)}**")
    table = markdown_table(["models", "preconditioning"] + [f"{mode} mean top-5" for mode in saved]
                           + ["mean over the kind's settings"], rows)
    return (f"{table}\n\nRecipe: {default}; the verdict against \"none\" in each setting is by the seeds' spread.\n"
            + "\n".join(lines))


def plot_headline(saved: dict, path: Path, default: str) -> None:
    """Mean detection rate over the groups against k, on the evaluation queries, with the seeds' spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(saved), figsize=(4.2 * len(saved), 3.8), sharey=True, squeeze=False)
    colours: dict[str, str] = {}  # one colour per method in every panel

    def colour(label: str) -> str:
        return colours.setdefault(label, f"C{len(colours)}")

    for ax, (mode, results) in zip(axes[0], saved.items()):
        baselines = results["baselines"]["evaluation"]
        groups = list(baselines)
        ks = list(next(iter(baselines.values()))[next(iter(next(iter(baselines.values()))))])
        xs = [int(k) for k in ks]
        for method in next(iter(baselines.values())):
            ax.plot(xs, [np.mean([baselines[g][method][k] for g in groups]) for k in ks], "--", marker="o", ms=3,
                    label=method, color=colour(method))
        for name in dict.fromkeys(["paper", default]):
            if name not in results["recipes"]:
                continue
            values = [seed_values(results["recipes"][name], "evaluation", REFERENCE_METHOD, k) for k in ks]
            label = f"DMin K=4096, {name} recipe" + (" (default)" if name == default else "")
            ax.errorbar(xs, [v.mean() for v in values], yerr=[v.std() for v in values], marker="o", ms=3, capsize=2,
                        label=label, color=colour(label))
        ax.set_xscale("log")
        ax.set_xticks(xs, ks)
        ax.set_title(mode)
        ax.set_xlabel("top-k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5, loc="lower left")
    axes[0][0].set_ylabel("detection rate (mean over subsets)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lds_section(quick: bool, results_dir: Path | None) -> str | None:
    """The summary of ``benchmarks/lds.py``'s saved results (the field's metric beside the paper's), if any."""
    found = [json.loads(p.read_text()) for p in sorted((results_dir or RESULTS_DIR).glob(
        f"lds{'-quick' if quick else ''}-*.json"))]
    saved = {result["setting"]: result for result in found}
    if not saved:
        return None
    return (summary_table(saved) + "\n\nFrom `benchmarks/lds.py` (re-scored from the committed retraining data); "
            "every method row, the noise ceiling and the protocol are in `lds.md`.")


def write_quality_report(saved: dict, quick: bool, results_dir: Path | None, recipes: dict, default: str) -> Path:
    """Writes ``quality[-quick].md`` (and the plot) from the saved results of each setting; ``default`` names the
    recipe of ``DMinConfig()``."""
    if not saved:
        raise SystemExit("no saved results: run a setting first")
    run = next(iter(saved.values()))["run"]
    notes = [n for r in saved.values() for n in r["notes"]]
    recipe_lines = [f"- **{name}**: " + ", ".join(f"{k}={v}" for k, v in fields.items()) for name, fields in
                    recipes.items() if any(name in r["recipes"] for r in saved.values())]
    timesteps = ", ".join(f"{mode} {r['num_timesteps']}" for mode, r in saved.items())
    setup = (f"T = {timesteps} timesteps; {run['seeds']} seeds of the DMin noise and compressor key per "
             f"recipe (mean ± std over them; baselines do not depend on the seed); {run['sizes']['inference_steps']} "
             f"sampling steps at guidance {run['sizes']['guidance_scale']}. Two query sets per setting from disjoint "
             "held-out prompts and generation seeds: the recipe grid is measured on the *selection* queries, the "
             "headline tables on the *evaluation* queries. A recipe is called better or worse than another only "
             "where the difference of the means exceeds the larger of their two standard deviations.\n\n"
             + "\n".join(f"- {n}" for n in notes) + "\n\nRecipes (changes to the paper's are in the name):\n\n"
             + "\n".join(recipe_lines))
    plot = plot_path("detection_rate", quick, results_dir)
    plot_headline(saved, plot, default)
    sections = [("Setup", setup)]
    for mode, results in saved.items():
        sections.append((f"Detection rate, {mode} (evaluation queries)", headline_table(results, default)))
    for mode, results in saved.items():
        sections.append((f"Recipe grid, {mode} (selection queries, {REFERENCE_METHOD})", grid_table(results)))
    sections.append(("Choice of the default recipe", choice_section(saved, default)))
    if all(mode in SETTING_FAMILIES for mode in saved):
        sections.append(("Choice of the default preconditioning", preconditioning_choice_section(saved, default)))
    for mode, results in saved.items():
        if "self_retrieval" in next(iter(results["recipes"]["paper"]["seeds"].values())):
            sections.append((f"Self-retrieval, {mode} (each instance row attributed with its own prompt)",
                             self_retrieval_table(results, default)))
    for mode, results in saved.items():
        if "counterfactual" in results:
            sections.append((f"Counterfactual, {mode}: retraining without the top-k rows", results["counterfactual"]))
    for mode, results in saved.items():
        if results.get("fidelity"):
            sections.append((f"Compression fidelity, {mode} (paper recipe, seed 0, selection queries)",
                             results["fidelity"]["selection"]))
    lds = lds_section(quick, results_dir)
    if lds is not None:
        sections.append(("Linear datamodeling score (LDS)", lds))
    sections.append(("Plot", f"![detection rate]({plot.name}) written to `{plot}`"))
    return write_report("quality", sections, quick, results_dir)

"""The LDS benchmark's markdown report, built from the saved JSON alone (``lds.py --report``)."""

from __future__ import annotations

import numpy as np

from common import machine_info, markdown_table
from lds_metrics import ceiling, mean_se

PROTOCOL = """\
LDS (linear datamodeling score, D-TRAK's protocol at laptop scale): M random 50 % subsets of the training rows,
one model per (subset, training seed), every one from the full model's initialisation with its recipe, on training
seeds the full model does not use. A model's output for a query is its diffusion loss averaged over fixed
(timestep, noise) pairs (the same pairs for every model). A method's prediction for subset m is the sum of its
scores over the rows in m; LDS(query) = Spearman over the M subsets between the prediction and minus the loss
averaged over the training seeds. Figures: mean ± standard error over queries at DMin seed 0 (random: draw 0), and
the spread (std) of the per-seed means over the DMin seeds (random: over draws). Preconditioning, damping
(λ = damping · s₁, s₁ the largest eigenvalue of each timestep's (centred) second-moment matrix) and T x K are chosen on
the *selection* queries and reported on the *evaluation* queries.

Noise ceiling: r = Spearman over subsets between the losses of two training seeds (mean over seed pairs, then
mean ± s.e. over queries). The seed-averaged target of S seeds has Spearman-Brown reliability
ρ_S = S r / (1 + (S - 1) r); a perfect predictor (the expected loss over training seeds) would reach about
sqrt(ρ_S) against it, the ceiling printed beside the LDS."""


def fmt(mean: float, error: float) -> str:
    return f"{mean:.3f} ± {error:.3f}"


def query_mean(seed_result: dict, positions: list[int]) -> tuple[float, float]:
    return mean_se(np.asarray(seed_result["lds"])[positions])


def seeds_spread(entry: dict, positions: list[int]) -> str:
    means = [np.nanmean(np.asarray(s["lds"])[positions]) for s in entry["seeds"].values()]
    return f"{np.std(means):.3f} ({len(means)})" if len(means) > 1 else "-"


def detection_cells(entry: dict, name: str) -> list[str]:
    first = next(iter(entry["seeds"].values()))
    if "detection" not in first:
        return []
    cells = []
    for k in ("5", "10"):
        values = [s["detection"][name][k] for s in entry["seeds"].values()]
        cells.append(f"{np.mean(values):.2f}" + (f" ± {np.std(values):.2f}" if len(values) > 1 else ""))
    return cells


def method_table(methods: dict, query_sets: dict, ceiling_text: dict) -> str:
    """One row per method: LDS on both query sets, detection (t2i-lora), self-retrieval."""
    first = next(iter(methods.values()))["seeds"]
    detection = "detection" in next(iter(first.values()))
    headers = ["method", "LDS selection", "seeds' std", "LDS evaluation", "seeds' std"]
    if detection:
        headers += [f"{name} top-{k}" for name in query_sets for k in (5, 10)]
    headers.append("self-retrieval")
    rows = []
    for name, entry in methods.items():
        seed0 = next(iter(entry["seeds"].values()))
        row = [name]
        for set_name in ("selection", "evaluation"):
            row += [fmt(*query_mean(seed0, query_sets[set_name])), seeds_spread(entry, query_sets[set_name])]
        if detection:
            row += [c for set_name in query_sets for c in detection_cells(entry, set_name)]
        values = [s["self_retrieval"] for s in entry["seeds"].values() if "self_retrieval" in s]
        row.append(f"{np.mean(values):.2f}" if values else "-")
        rows.append(row)
    rows.append(["noise ceiling sqrt(ρ_S)", ceiling_text["selection"], "", ceiling_text["evaluation"], ""]
                + [""] * (len(headers) - 5))
    return markdown_table(headers, rows)


def ceiling_section(losses: np.ndarray, query_sets: dict) -> tuple[str, dict]:
    rows, short = [], {}
    for name, positions in query_sets.items():
        c = ceiling(losses[:, :, positions])
        rows.append([name, fmt(c["seed_to_seed"], c["seed_to_seed_se"]), c["seeds"], f"{c['spearman_brown']:.3f}",
                     f"{c['ceiling']:.3f}"])
        short[name] = f"{c['ceiling']:.3f}"
    table = markdown_table(["query set", "seed-to-seed Spearman r", "seeds S", "ρ_S = S r / (1 + (S-1) r)",
                            "ceiling sqrt(ρ_S)"], rows)
    return table, short


def winners(result: dict) -> str:
    """Which option wins on selection queries, per recipe, and what it scores on evaluation queries."""
    lines, sets = [], result["query_sets"]
    for recipe, name in result["best"].items():
        entry = result["methods"][name]
        seed0 = next(iter(entry["seeds"].values()))
        sel = np.mean([np.nanmean(np.asarray(s["lds"])[sets["selection"]]) for s in entry["seeds"].values()])
        lines.append(f"- {recipe}: best on selection queries **{name}** (selection LDS {sel:.3f}, mean over DMin "
                     f"seeds); on evaluation queries {fmt(*query_mean(seed0, sets['evaluation']))} (seed 0), "
                     f"seeds' std {seeds_spread(entry, sets['evaluation'])}")
    return "\n".join(lines)


def paired_differences(result: dict) -> str:
    """Evaluation-query LDS of each recipe's chosen option minus each reference row, paired by query (seed 0)."""
    methods, chosen = result["methods"], result["query_sets"]["evaluation"]
    references = [n for n in ("paper: none", "squared-norm: none", "pixel cosine", "latent cosine") if n in methods]
    rows = []
    for recipe, name in result["best"].items():
        mine = np.asarray(next(iter(methods[name]["seeds"].values()))["lds"])[chosen]
        cells = []
        for reference in references:
            theirs = np.asarray(next(iter(methods[reference]["seeds"].values()))["lds"])[chosen]
            cells.append(fmt(*mean_se(mine - theirs)))
        rows.append([name] + cells)
    return markdown_table(["chosen option (evaluation queries)"] + [f"minus {r}" for r in references], rows)


def summary_table(saved: dict) -> str:
    """Evaluation-query LDS of the headline rows of every setting, beside its ceiling."""
    rows = []
    for setting, result in saved.items():
        sets, methods = result["query_sets"], result["methods"]
        names = dict.fromkeys([n for n in ("random", "pixel cosine", "latent cosine", "paper: none",
                                           "squared-norm: none") if n in methods] + list(result["best"].values()))
        c = ceiling(np.asarray(result["losses"])[:, :, sets["evaluation"]])
        for name in names:
            seed0 = next(iter(methods[name]["seeds"].values()))
            rows.append([setting, name, fmt(*query_mean(seed0, sets["evaluation"])),
                         seeds_spread(methods[name], sets["evaluation"]), f"{c['ceiling']:.3f}"])
    return markdown_table(["setting", "method (chosen ones: on selection queries)", "LDS evaluation (seed 0)",
                           "DMin seeds' std", "noise ceiling"], rows)


def setting_section(result: dict) -> str:
    setup, sets = result["setup"], result["query_sets"]
    losses = np.asarray(result["losses"])
    sizes = setup["sizes"]
    ceiling_table, short = ceiling_section(losses, sets)
    text = (f"{sizes['rows']} training rows; {result['masks_count']} subsets x {losses.shape[0]} training seeds "
            f"{setup['train_seeds']} (full model: seed {setup['full_model_train_seed']}); each model "
            f"{sizes['steps']} AdamW steps, batch {sizes['batch_size']}, lr {sizes['lr']:g} cosine-decayed; "
            f"{len(sets['selection'])} selection + {len(sets['evaluation'])} evaluation queries; model output = "
            f"loss over {sizes['pairs']} fixed (t, noise) pairs (seed {setup['pairs_seed']}). DMin: T = "
            f"{result['plan']['num_timesteps']}, K = {result['plan']['dim']}, DMin seeds "
            f"{result['plan']['seeds']}; re-scored in {result['seconds']:.0f}s.\n\n")
    text += "### Noise ceiling\n\n" + ceiling_table + "\n\n### LDS per method\n\n"
    text += method_table(result["methods"], sets, short) + "\n\n### Chosen on selection queries\n\n"
    text += winners(result) + "\n\nPaired by query (mean ± s.e. of the per-query difference):\n\n"
    text += paired_differences(result) + "\n"
    if result["timestep_grid"]:
        text += ("\n### Timesteps at fixed storage (T x K), each recipe's best option\n\n"
                 + method_table(result["timestep_grid"], sets, short) + "\n")
    for note in result["notes"]:
        text += f"\n- {note}"
    return text + "\n"


def build_report(saved: dict, quick: bool) -> str:
    text = f"# LDS{' (--quick)' if quick else ''}\n\nMachine: {machine_info()}\n\n{PROTOCOL}\n"
    if saved:
        text += "\n## Summary\n\n" + summary_table(saved) + "\n"
    for setting, result in saved.items():
        text += f"\n## {setting}\n\n" + setting_section(result)
    return text

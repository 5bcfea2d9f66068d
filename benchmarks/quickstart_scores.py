"""What the quickstart's scores look like under each preconditioning: label match of the top rows, and how much the
top-10 scores stand out from the rest (the contrast a user reads).

Runs after ``examples/quickstart.py`` (which saves the trained pipeline, its training rows and the index): the
index is copied, switched to each preconditioning with ``AttributionIndex.refit`` (no gradient is computed), and the
quickstart's generated digits (regenerated from the saved pipeline with the quickstart's seed and steps) are
attributed through ``pipe.attribute``.

    python examples/quickstart.py && python benchmarks/quickstart_scores.py   # -> results/quickstart-scores.md
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from datasets import load_from_disk
from diffusers import DDPMPipeline

import dmin_diffusers as dm
from dmin_diffusers.config import PRECONDITIONINGS

from common import add_common_arguments, markdown_table, setup_threads, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import quickstart  # noqa: E402  (its digit reader and generation, exactly as the quickstart runs them)


def regenerate(output_dir: Path, args: argparse.Namespace) -> tuple[dm.DMinDDPMPipeline, list, list[int]]:
    """The saved pipeline, the quickstart's generated digits and the labels its classifier reads."""
    saved = DDPMPipeline.from_pretrained(output_dir)
    images = quickstart.generate_digits(saved.unet, saved.scheduler, args.num_images, args.num_inference_steps,
                                        args.seed)
    classifier, _ = quickstart.train_digit_classifier(args.seed)
    labels, _ = quickstart.read_digits(classifier, images)
    return dm.DMinDDPMPipeline(unet=saved.unet, scheduler=saved.scheduler), images, labels


def describe(method: str, pipe, index_dir: Path, dataset, images, labels, top_k: int) -> list[str]:
    pipe.load_attribution_index(index_dir, dataset=dataset)
    results = pipe.attribute(images, top_k=len(dataset), exact=True)  # every row: the spread of the whole ranking
    train_labels = np.asarray(dataset["label"])
    match = np.mean([np.mean(train_labels[r.indices[:top_k]] == label) for r, label in zip(results, labels)])
    scores = [np.asarray(r.scores) for r in results]
    top = [s[:top_k] for s in scores]
    gap = np.mean([(s[:top_k].mean() - s.mean()) / s.std() for s in scores])  # z-score of the top rows
    first = results[0]
    return [method, f"{match:.1%}", f"{np.mean([t[0] for t in top]):.4g}", f"{np.mean([t[-1] for t in top]):.4g}",
            f"{np.mean([t[0] - t[-1] for t in top]):.3g}", f"{np.mean([s.mean() for s in scores]):.4g}",
            f"{gap:.2f}", ", ".join(f"{i} ({s:.3g})" for i, s in zip(first.indices[:3], first.scores[:3]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "not used (the quickstart's output is the input)")
    parser.add_argument("--output_dir", type=Path, default=Path("quickstart-output"), help="the quickstart's")
    parser.add_argument("--num_images", type=int, default=6)
    parser.add_argument("--num_inference_steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top_k", type=int, default=10)
    args = parser.parse_args()
    setup_threads(args.threads)
    pipe, images, labels = regenerate(args.output_dir, args)
    dataset = load_from_disk(str(args.output_dir / "train-dataset"))
    built = dm.AttributionIndex(args.output_dir / "attribution-index")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "index"
        built.save_pretrained(copy)
        for method in PRECONDITIONINGS:
            dm.AttributionIndex(copy).refit(method)
            rows.append(describe(method, pipe, copy, dataset, images, labels, args.top_k))
            print(rows[-1], flush=True)
        shutil.rmtree(copy)
    table = markdown_table(
        ["preconditioning", f"top-{args.top_k} label match", "top-1 score", f"top-{args.top_k}th score",
         f"top-1 - top-{args.top_k}th", "mean score (all rows)", f"top-{args.top_k} z-score",
         "image 0: top rows (score)"], rows)
    body = (
        f"The quickstart's index ({built.num_rows} rows, T = {built.config.num_timesteps}, K = "
        f"{built.config.projection_dim}, built with preconditioning `{built.config.preconditioning}`), switched to "
        f"each preconditioning by `AttributionIndex.refit` (damping {built.config.preconditioning_damping:g}); "
        f"{len(images)} generated digits (seed {args.seed}, {args.num_inference_steps} steps) attributed exactly over "
        f"every row; means over the images. *z-score*: how many standard deviations of all rows' scores the top-"
        f"{args.top_k} mean stands above the mean row (the contrast a user sees).\n\n" + table
    )
    write_report("quickstart-scores", [("Scores of the quickstart's generated digits", body)], False,
                 args.results_dir)


if __name__ == "__main__":
    main()

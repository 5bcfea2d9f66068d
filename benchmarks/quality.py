"""Does DMin find the training rows that shaped an image? The paper's detection-rate protocol (section 4.1) at
laptop scale, a counterfactual retraining check, and compression fidelity.

* Text-to-image: a tiny Stable Diffusion UNet fine-tuned on a drawn data set of five subsets (lego < 1 % of the
  rows); for held-out prompts of flowers, lego and cards: generate, attribute, and report the share of the top-k
  rows that come from the prompt's subset.
* Unconditional DDPM on scikit-learn's 8x8 digits: the share of the top-k rows whose label is the class a
  classifier reads from the generated digit.
* Methods (rows of the paper's Table 2): random, pixel similarity, uncompressed gradients with and without
  normalisation, DMin exact and HNSW at several K. One backward pass per (row, timestep) feeds every method: the
  raw gradient from ``GradientSketcher.flat_gradients``, its normalisation, and its sketch at the largest K, folded
  to the smaller ones (nested sketches); the first row is checked against ``GradientSketcher.sketch``.
* Counterfactual (digits): retrain without the top-k attributed rows of a generated image, and without k random
  rows (same seeds otherwise); how much does the model's loss on that image rise?
* Compression fidelity: Spearman and top-10 overlap of compressed vs uncompressed scores over 4 keys of the
  sketch, and the score error against the count sketch's theoretical standard deviation (``fidelity_table``).

    python benchmarks/quality.py --quick    # a few minutes
    python benchmarks/quality.py            # the full tables (about an hour on one core)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import hnswlib
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from scipy.stats import spearmanr

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher, PreparedExample, resolve_config
from dmin_diffusers.search import KnnIndex
from dmin_diffusers.sketch import SketchProjector, fold_sketch
from dmin_diffusers.testing import tiny_pipeline

from common import add_common_arguments, markdown_table, plot_path, setup_threads, write_report
from quality_data import EVALUATED, digits_classifier, heldout_prompts, load_digit_rows, make_t2i_dataset

TOP_KS = (5, 10, 50, 100)


@dataclass
class Settings:
    """Sizes of one run (``--quick`` or full)."""

    t2i_rows: int
    t2i_steps: int
    prompts_per_subset: int
    digit_rows: int
    digit_steps: int
    digit_queries: int
    num_timesteps: int
    dims: tuple[int, ...]
    hnsw_max_floats: int
    counterfactual_images: int
    inference_steps: int
    fidelity_keys: int = 4  # keys of the permutation and signs averaged in the fidelity table
    guidance_scale: float = 4.0
    seed: int = 0
    notes: list[str] = field(default_factory=list)


QUICK = Settings(250, 400, 2, 200, 150, 6, 3, (2**10, 2**12, 2**14), 2**28, 1, 30)
FULL = Settings(800, 2000, 8, 600, 1200, 20, 10, (2**10, 2**12, 2**14, 2**16), 2**29, 4, 100)


# --------------------------------------------------------------------------------------------------
# Scoring: one backward pass per (row, timestep) feeds every gradient method
# --------------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """(queries, rows) score matrices per method, and the sketched rows for HNSW."""

    methods: dict[str, torch.Tensor]
    row_sketches: torch.Tensor  # (rows, T, K_max) float16
    query_sketches: torch.Tensor  # (queries, T, K_max) float32
    # Inner products of the normalised uncompressed gradients, for the error theory: query timestep t with row
    # timestep s (queries, rows, T, T), and each gradient's timesteps with each other (queries or rows, T, T).
    cross: torch.Tensor
    query_gram: torch.Tensor
    row_gram: torch.Tensor
    same_coordinate: torch.Tensor  # (queries, rows): sum_d (sum_t q_td r_td)^2, a coordinate colliding with itself
    seed_scores: dict[int, torch.Tensor]  # K -> (keys, queries, rows) DMin exact scores; key 0 is the package's


def sketch_rows(projector: SketchProjector, normalised: torch.Tensor) -> torch.Tensor:
    """The package's sketch of already-normalised (T, D) gradients (split per parameter, as the hooks see them)."""
    out = []
    for row in normalised:
        accumulator = projector.new_accumulator()
        for index, piece in enumerate(torch.split(row, projector.parameter_sizes)):
            projector.accumulate(accumulator, index, piece)
        out.append(projector.finalize(accumulator))
    return torch.stack(out)


def gradient_scores(sketcher: GradientSketcher, rows: list[PreparedExample], queries: list[PreparedExample],
                    extra_seeds: int = 0) -> Scores:
    """Uncompressed (normalised and raw) and DMin scores of every query against every row; DMin exact scores also
    under ``extra_seeds`` other keys of the permutation and signs (``Scores.seed_scores``, for the fidelity table)."""
    main = sketcher.projector
    projectors = [main] + [SketchProjector(main.parameter_sizes, main.dim, sketcher.config.seed + 1 + i)
                           for i in range(extra_seeds)]
    dims = sketcher_dims(sketcher)
    q_raw = torch.stack([sketcher.flat_gradients(q, normalize=False) for q in queries])  # (Q, T, D)
    q_norm = F.normalize(q_raw, dim=-1)
    q_sketches = [torch.stack([sketch_rows(projector, q) for q in q_norm]) for projector in projectors]
    q_folded = [{dim: fold_sketch(q_sketch, dim) for dim in dims} for q_sketch in q_sketches]
    num_rows, (num_q, num_t, _) = len(rows), q_raw.shape
    raw_scores, norm_scores = torch.zeros(num_q, num_rows), torch.zeros(num_q, num_rows)
    cross = torch.zeros(num_q, num_rows, num_t, num_t)
    row_gram = torch.zeros(num_rows, num_t, num_t)
    same_coordinate = torch.zeros(num_q, num_rows)
    seed_scores = {dim: torch.zeros(len(projectors), num_q, num_rows) for dim in dims}
    row_sketches = torch.zeros(num_rows, num_t, main.dim, dtype=torch.float16)
    for n, example in enumerate(rows):
        raw = sketcher.flat_gradients(example, normalize=False)
        normalised = F.normalize(raw, dim=-1)
        raw_scores[:, n] = torch.einsum("qtd,td->q", q_raw, raw)
        cross[:, n] = torch.einsum("qtd,sd->qts", q_norm, normalised)
        row_gram[n] = normalised @ normalised.T
        same_coordinate[:, n] = torch.einsum("qtd,td->qd", q_norm, normalised).square().sum(-1)
        norm_scores[:, n] = cross[:, n].diagonal(dim1=-2, dim2=-1).sum(-1)
        for i, projector in enumerate(projectors):
            sketch = sketch_rows(projector, normalised).half()
            if i == 0:
                row_sketches[n] = sketch
            for dim in dims:
                row_folded = fold_sketch(sketch.float(), dim)
                seed_scores[dim][i, :, n] = torch.einsum("qtk,tk->q", q_folded[i][dim], row_folded)
        if n == 0:  # the benchmark's path must be the package's path
            reference = sketcher.sketch(example)
            assert torch.allclose(reference, row_sketches[0].float(), atol=2e-3), "sketch differs from the package"
    methods = {"uncompressed, no normalisation": raw_scores, "uncompressed, normalised": norm_scores}
    for dim in dims:
        methods[f"DMin exact, K=2^{dim.bit_length() - 1}"] = seed_scores[dim][0]
    query_gram = torch.einsum("qtd,qsd->qts", q_norm, q_norm)
    return Scores(methods, row_sketches, q_sketches[0], cross, query_gram, row_gram, same_coordinate, seed_scores)


_DIMS: tuple[int, ...] = ()


def sketcher_dims(sketcher: GradientSketcher) -> tuple[int, ...]:
    return tuple(d for d in _DIMS if d <= sketcher.config.projection_dim)


def hnsw_rankings(scores: Scores, dim: int, top_k: int) -> list[list[int]]:
    """Top-k rows of every query from an HNSW index over the rows folded to ``dim`` (the package's
    ``KnnIndex.candidates``, one thread)."""
    num_rows, num_t, _ = scores.row_sketches.shape
    vectors = fold_sketch(scores.row_sketches.float(), dim).reshape(num_rows, -1).numpy()
    index = hnswlib.Index(space="ip", dim=num_t * dim)
    index.init_index(max_elements=num_rows, M=32, ef_construction=200, random_seed=0)
    index.add_items(vectors, np.arange(num_rows), num_threads=1)
    knn = KnnIndex(index, num_t, dim)
    return [knn.candidates(fold_sketch(q, dim), top_k) for q in scores.query_sketches]


def detection_rates(rankings: list[list[int]], row_labels: np.ndarray, query_labels: list) -> dict[int, float]:
    """Mean share of the top-k rows whose label is the query's, for every k of ``TOP_KS``."""
    return {k: float(np.mean([np.mean(row_labels[r[:k]] == q) for r, q in zip(rankings, query_labels)]))
            for k in TOP_KS}


def evaluate_methods(scores: Scores, pixel_similarity: torch.Tensor, row_labels: np.ndarray, query_labels: list,
                     settings: Settings, seed: int) -> dict[str, dict[int, float]]:
    """Detection rates of every method (Table 2's rows)."""
    kmax = min(max(TOP_KS), len(row_labels))
    generator = torch.Generator().manual_seed(seed)
    random = [[torch.randperm(len(row_labels), generator=generator)[:kmax].tolist() for _ in range(20)]
              for _ in query_labels]
    results = {"random selection": {k: float(np.mean([detection_rates(list(draws), row_labels, [q] * 20)[k]
                                                      for draws, q in zip(random, query_labels)]))
                                    for k in TOP_KS}}
    ranked = {"pixel similarity (cosine)": pixel_similarity, **scores.methods}
    for name, matrix in ranked.items():
        results[name] = detection_rates(torch.argsort(matrix, dim=1, descending=True)[:, :kmax].tolist(),
                                        row_labels, query_labels)
    num_rows, num_t, _ = scores.row_sketches.shape
    for dim in _DIMS:
        if dim > scores.row_sketches.shape[-1]:
            continue
        if num_rows * num_t * dim > settings.hnsw_max_floats:
            settings.notes.append(f"HNSW at K={dim} skipped: {num_rows}x{num_t * dim} floats exceed the memory cap")
            continue
        results[f"DMin HNSW, K=2^{dim.bit_length() - 1}"] = detection_rates(
            hnsw_rankings(scores, dim, kmax), row_labels, query_labels)
    return results


# --------------------------------------------------------------------------------------------------
# Text-to-image
# --------------------------------------------------------------------------------------------------


def training_latents(pipe, dataset) -> torch.Tensor:
    """Latents of every row, after setting the VAE's ``scaling_factor`` so that they have unit variance.

    The tiny VAE is random-initialised: with its default factor its latents have a standard deviation near 0.06,
    and the UNet would learn to denoise towards a tiny scale that generation, starting from unit noise, never
    reaches. Stable Diffusion's 0.18215 was chosen the same way (1 / std of the latents of its training images)."""
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                          for im in dataset["image"]])
    with torch.no_grad():
        raw = pipe.vae.encode(pixels).latent_dist.mean
    pipe.vae.register_to_config(scaling_factor=float(1 / raw.std()))
    return detect_family(pipe).encode_image(pixels)


def train_unet_t2i(pipe, dataset, steps: int, seed: int, batch_size: int = 16, empty_prompts: float = 0.1) -> None:
    """Fine-tunes the whole tiny UNet (text encoder and VAE frozen) on the data set, diffusers' recipe with
    ``--proportion_empty_prompts 0.1`` so that classifier-free guidance works at generation."""
    family = detect_family(pipe)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = training_latents(pipe, dataset)
    with torch.no_grad():
        conditioning = torch.cat([family.encode_prompt(t)["encoder_hidden_states"] for t in dataset["text"]])
        empty = family.encode_prompt("")["encoder_hidden_states"]
    unet = pipe.unet
    unet.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(latents), (batch_size,), generator=generator)
        noise = torch.randn(latents[batch].shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        prompts = torch.where((torch.rand(batch_size, generator=generator) < empty_prompts)[:, None, None],
                              empty, conditioning[batch])
        prediction = unet(scheduler.add_noise(latents[batch], noise, t), t, encoder_hidden_states=prompts).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unet.eval()
    print(f"  t2i training loss (last batch) {loss.item():.3f}", flush=True)


def run_t2i(settings: Settings) -> tuple[dict[str, dict[str, dict[int, float]]], Scores]:
    dataset = make_t2i_dataset(settings.t2i_rows, settings.seed)
    pipe = tiny_pipeline("sd", dm.DMinStableDiffusionPipeline, seed=settings.seed)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    train_unet_t2i(pipe, dataset, settings.t2i_steps, settings.seed)
    print(f"  trained in {time.perf_counter() - start:.0f}s", flush=True)
    family = detect_family(pipe)
    config = resolve_config(dm.DMinConfig(num_timesteps=settings.num_timesteps, projection_dim=max(_DIMS)), family)
    sketcher = GradientSketcher(family, config)
    captions = set(dataset["text"])
    prompts = [(subset, p) for subset in EVALUATED
               for p in heldout_prompts(subset, settings.prompts_per_subset, captions)]
    generator = torch.Generator().manual_seed(settings.seed)
    # The tiny VAE is random-init and cannot round-trip an image, so queries are the generated latents (what
    # a faithful VAE would encode the decoded image back to), with the prompt encoded as for the rows.
    queries = []
    for _, prompt in prompts:
        latents = pipe(prompt, num_inference_steps=settings.inference_steps, generator=generator,
                       output_type="latent", guidance_scale=settings.guidance_scale).images
        queries.append(PreparedExample(latents=latents, conditioning=family.encode_prompt(prompt)))
    rows = [sketcher.prepare(r["image"], r["text"]) for r in dataset]
    start = time.perf_counter()
    scores = gradient_scores(sketcher, rows, queries, settings.fidelity_keys - 1)
    print(f"  gradients of {len(rows)} rows in {time.perf_counter() - start:.0f}s", flush=True)
    row_latents = torch.cat([r.latents for r in rows]).flatten(1)
    query_latents = torch.cat([q.latents for q in queries]).flatten(1)
    similarity = F.normalize(query_latents, dim=1) @ F.normalize(row_latents, dim=1).T
    labels = np.asarray(dataset["subset"])
    results = {}
    for subset in EVALUATED:
        chosen = [i for i, (s, _) in enumerate(prompts) if s == subset]
        sub = Scores({k: v[chosen] for k, v in scores.methods.items()}, scores.row_sketches,
                     scores.query_sketches[chosen], scores.cross[chosen], scores.query_gram[chosen], scores.row_gram,
                     scores.same_coordinate[chosen], {k: v[:, chosen] for k, v in scores.seed_scores.items()})
        results[subset] = evaluate_methods(sub, similarity[chosen], labels, [subset] * len(chosen), settings,
                                           settings.seed)
    share = {s: float(np.mean(labels == s)) for s in EVALUATED}
    settings.notes.append("text-to-image subset shares: "
                          + ", ".join(f"{s} {100 * v:.2f}% ({int(v * len(labels))} rows)" for s, v in share.items()))
    return results, scores


# --------------------------------------------------------------------------------------------------
# Digits (unconditional DDPM) and the counterfactual
# --------------------------------------------------------------------------------------------------


def make_digit_unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                       norm_num_groups=8, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def train_digits(pixels: torch.Tensor, keep: np.ndarray, steps: int, seed: int, batch_size: int = 32) -> UNet2DModel:
    """Trains a fresh UNet on ``pixels[keep]``; everything else (init, noise, timesteps, order) is seeded."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet = make_digit_unet(seed).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    data = pixels[torch.as_tensor(keep)]
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
        noise = torch.randn(batch.shape, generator=generator)
        t = torch.randint(0, 1000, (batch_size,), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(batch, noise, t), t).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return unet.eval()


@torch.no_grad()
def image_loss(unet: UNet2DModel, image: torch.Tensor, draws: int = 256, seed: int = 123) -> float:
    """The training loss on one image, averaged over fixed (timestep, noise) draws."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((draws, *image.shape[1:]), generator=generator)
    t = torch.linspace(0, 999, draws).long()
    batch = image.expand(draws, *image.shape[1:])
    return F.mse_loss(unet(scheduler.add_noise(batch, noise, t), t).sample, noise).item()


def run_digits(settings: Settings):
    pixels_np, labels = load_digit_rows(settings.digit_rows, settings.seed)
    pixels = torch.from_numpy(pixels_np)
    all_rows = np.arange(len(labels))
    start = time.perf_counter()
    unet = train_digits(pixels, all_rows, settings.digit_steps, settings.seed)
    print(f"  digits trained in {time.perf_counter() - start:.0f}s", flush=True)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    pipe = dm.DMinDDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generated = pipe(batch_size=settings.digit_queries, generator=torch.Generator().manual_seed(settings.seed),
                     num_inference_steps=settings.inference_steps, output_type="np").images  # (Q, 8, 8, 1) in [0, 1]
    classifier = digits_classifier()
    read = classifier.predict(generated[..., 0].reshape(len(generated), -1) * 16.0)
    family = detect_family(pipe)
    config = resolve_config(dm.DMinConfig(num_timesteps=settings.num_timesteps, projection_dim=max(_DIMS)), family)
    sketcher = GradientSketcher(family, config)

    def to_example(x: torch.Tensor) -> PreparedExample:  # digits are already model inputs
        return PreparedExample(latents=x[None], conditioning={})

    query_pixels = torch.from_numpy(generated).permute(0, 3, 1, 2) * 2 - 1
    start = time.perf_counter()
    scores = gradient_scores(sketcher, [to_example(x) for x in pixels], [to_example(x) for x in query_pixels],
                             settings.fidelity_keys - 1)
    print(f"  gradients of {len(pixels)} rows in {time.perf_counter() - start:.0f}s", flush=True)
    similarity = F.normalize(query_pixels.flatten(1), dim=1) @ F.normalize(pixels.flatten(1), dim=1).T
    results = evaluate_methods(scores, similarity, labels, list(read), settings, settings.seed)
    settings.notes.append(f"digits: generated digits read as {sorted(int(r) for r in read)}")
    counterfactual = run_counterfactual(settings, pixels, query_pixels, scores)
    return results, scores, counterfactual


def run_counterfactual(settings: Settings, pixels: torch.Tensor, queries: torch.Tensor, scores: Scores) -> str:
    """Retrain without the top-k DMin rows of an image and without k random rows; compare the loss rise."""
    k = max(5, len(pixels) // 20)
    dmin = scores.methods["DMin exact, K=2^12"]
    base = train_digits(pixels, np.arange(len(pixels)), settings.digit_steps, settings.seed)
    rows = []
    for i in range(settings.counterfactual_images):
        top = set(torch.argsort(dmin[i], descending=True)[:k].tolist())
        rand = set(np.random.default_rng([settings.seed, i]).choice(len(pixels), k, replace=False).tolist())
        base_loss = image_loss(base, queries[i:i + 1])
        rises = []
        for removed in (top, rand):
            keep = np.array([n for n in range(len(pixels)) if n not in removed])
            model = train_digits(pixels, keep, settings.digit_steps, settings.seed)
            rises.append(image_loss(model, queries[i:i + 1]) - base_loss)
        rows.append([i, base_loss, rises[0], rises[1], rises[0] - rises[1]])
        print(f"  counterfactual image {i}: base {base_loss:.4f}, rise top-k {rises[0]:+.4f}, random {rises[1]:+.4f}",
              flush=True)
    diffs = np.array([r[4] for r in rows])
    table = markdown_table(["image", "base loss", "rise w/o DMin top-k", "rise w/o random k", "difference"],
                           [[r[0]] + [f"{v:+.4f}" if j else f"{v:.4f}" for j, v in enumerate(r[1:])] for r in rows])
    summary = (f"\n\nk = {k} of {len(pixels)} rows removed; difference (top-k rise minus random rise): mean "
               f"{diffs.mean():+.4f}, std {diffs.std():.4f} over {len(rows)} image(s); positive in "
               f"{int((diffs > 0).sum())}/{len(rows)}. Loss = MSE on the image over 256 fixed (t, noise) draws.")
    return table + summary


# --------------------------------------------------------------------------------------------------
# Compression fidelity
# --------------------------------------------------------------------------------------------------


def fidelity_table(scores: Scores) -> str:
    """Spearman, top-10 overlap and RMS error of DMin exact against uncompressed normalised scores, per K, beside two
    predictions of the error's standard deviation for unit gradients. The simple one treats timesteps as
    independent: sum_t (1 + rho_t^2) / K. The exact one, for a random hash and signs shared by all timesteps, adds
    the covariance of correlated timesteps and removes a coordinate's collisions with itself:
    [sum_{t,s} (<q_t, q_s><r_t, r_s> + <q_t, r_s><q_s, r_t>) - 2 sum_d (sum_t q_td r_td)^2] / K. An error well
    above the exact prediction would mean the keyed permutation does not scatter coordinates like a random hash."""
    exact = scores.methods["uncompressed, normalised"]
    diagonal = scores.cross.diagonal(dim1=-2, dim2=-1)  # rho_t per (query, row, t)
    independent = diagonal.shape[-1] + diagonal.square().sum(-1)
    shared = (torch.einsum("qts,nts->qn", scores.query_gram, scores.row_gram)
              + torch.einsum("qnts,qnst->qn", scores.cross, scores.cross) - 2 * scores.same_coordinate)
    rows = []
    for dim, keyed in scores.seed_scores.items():
        spearman = np.mean([spearmanr(a, b)[0] for approx in keyed for a, b in zip(approx.numpy(), exact.numpy())])
        overlap = np.mean([len(set(torch.topk(a, 10).indices.tolist()) & set(torch.topk(b, 10).indices.tolist())) / 10
                           for approx in keyed for a, b in zip(approx, exact)])
        rms = float((keyed - exact).square().mean().sqrt())
        theories = [float((variance / dim).mean().sqrt()) for variance in (independent, shared)]
        rows.append([f"2^{dim.bit_length() - 1}", f"{spearman:.4f}", f"{overlap:.3f}", f"{rms:.4f}",
                     *(f"{t:.4f}" for t in theories)])
    header = f"Means over every (query, row) pair and {len(keyed)} keys of the permutation and signs.\n\n"
    return header + markdown_table(["K", "Spearman vs uncompressed", "top-10 overlap", "RMS score error",
                                    "theory sum_t (1 + rho_t^2) / K", "theory, exact for a random hash"], rows)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def detection_table(results: dict[str, dict[str, dict[int, float]]]) -> str:
    groups = list(results)
    methods = list(next(iter(results.values())))
    headers = ["method"] + [f"{g} top-{k}" for g in groups for k in TOP_KS]
    rows = [[m] + [f"{results[g][m][k]:.3f}" if m in results[g] else "-" for g in groups for k in TOP_KS]
            for m in methods]
    return markdown_table(headers, rows)


def plot_detection(results: dict[str, dict[str, dict[int, float]]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), sharey=True)
    for ax, (group, methods) in zip(np.atleast_1d(axes), results.items()):
        for name, rates in methods.items():
            style = "-" if name.startswith("DMin") else "--"
            ax.plot(TOP_KS, [rates[k] for k in TOP_KS], style, marker="o", ms=3, label=name)
        ax.set_xscale("log")
        ax.set_xticks(TOP_KS, [str(k) for k in TOP_KS])
        ax.set_title(group)
        ax.set_xlabel("top-k")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("detection rate")
    np.atleast_1d(axes)[-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    global _DIMS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "small sizes, a few minutes")
    args = parser.parse_args()
    setup_threads(args.threads)
    settings = QUICK if args.quick else FULL
    _DIMS = settings.dims
    start = time.perf_counter()
    print("text-to-image ...", flush=True)
    t2i, t2i_scores = run_t2i(settings)
    print(f"[{time.perf_counter() - start:.0f}s] digits ...", flush=True)
    digits, digit_scores, counterfactual = run_digits(settings)
    results = {**{f"t2i {k}": v for k, v in t2i.items()}, "digits": digits}
    plot = plot_path("detection_rate", args.quick, args.results_dir)
    plot_detection(results, plot)
    t2i_fidelity = fidelity_table(t2i_scores)
    digit_fidelity = fidelity_table(digit_scores)
    setup = (f"{settings.t2i_rows} text-to-image rows, tiny SD UNet fine-tuned in full for {settings.t2i_steps} steps "
             f"({settings.prompts_per_subset} held-out prompts per subset); {settings.digit_rows} digits, DDPM "
             f"trained {settings.digit_steps} steps ({settings.digit_queries} generated digits); T = "
             f"{settings.num_timesteps} timesteps; {settings.inference_steps} sampling steps.")
    sections = [
        ("Setup", setup + "\n\n" + "\n".join(f"- {n}" for n in dict.fromkeys(settings.notes))),
        ("Detection rate (share of the top-k rows from the query's subset / digit class)", detection_table(results)),
        ("Counterfactual: retraining the digits DDPM without the top-k rows", counterfactual),
        ("Compression fidelity: text-to-image (DMin exact vs uncompressed normalised)", t2i_fidelity),
        ("Compression fidelity: digits", digit_fidelity),
        ("Plot", f"![detection rate]({plot.name}) written to `{plot}`"),
    ]
    write_report("quality", sections, args.quick, args.results_dir)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()

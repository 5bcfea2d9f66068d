"""Retraining for the LDS benchmark (``lds.py``): the full model of each setting, its generated queries, the random
50 % subsets and one model per (training seed, subset), each scored by its diffusion loss on every query.

Everything that re-scoring needs is written under ``<results>/lds/<setting>/`` as safetensors + JSON:

* ``setup.json``: sizes, seeds, the (t, noise) pairs' seed, query prompts / labels, timings;
* ``model.safetensors``: the full model's weights (digits: the UNet; t2i-lora: the tiny SD's UNet with its LoRA,
  VAE and text encoder, so the base needs no re-training);
* ``queries.safetensors``: digits: the generated 8x8 pixels; t2i-lora: the generated images (uint8) and latents;
* ``masks.safetensors``: (M, N) uint8, 1 where the row is in subset m;
* ``losses.safetensors``: (seeds, M, Q) float32 losses and a (seeds, M) ``done`` flag, rewritten after every
  model, so a stopped run resumes where it stopped (``--retrain`` again).

Subset models start from the full model's initialisation (digits: the UNet init; t2i-lora: the same frozen base and
LoRA init) and use the full model's recipe, but their training streams (noise, timesteps, batch order) come from
seeds the full model does not use.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family
from lds_metrics import PAIRS_SEED, SUBSET_SEED, fixed_pairs, subset_masks
from quality_data import digits_classifier, load_digit_rows, make_t2i_dataset
from quality_setups import (QUERY_SETS, Sizes, add_training_lora, encode_latents, generate, make_digit_unet,
                            pretrained_sd, sd_prompt, t2i_prompts, to_pixels, train_digits)
from tiny_models import tiny_pipeline

TRAIN_SEED_BASE = 1000  # training seed s of the subset models is TRAIN_SEED_BASE + s; the full model uses seed 0/1


@dataclass
class RetrainSizes:
    """The sizes of one setting's retraining."""

    rows: int
    steps: int
    batch_size: int
    lr: float
    subsets: int
    seeds: int
    pairs: int
    queries_per_set: int  # digits: generated digits per set; t2i-lora: prompts per evaluated subset per set
    inference_steps: int
    pretrain_rows: int = 0
    vae_steps: int = 0
    pretrain_steps: int = 0
    lora_rank: int = 8


SIZES = {
    "digits": RetrainSizes(rows=400, steps=130, batch_size=32, lr=2e-3, subsets=48, seeds=2, pairs=100,
                           queries_per_set=16, inference_steps=100),
    "t2i-lora": RetrainSizes(rows=160, steps=600, batch_size=16, lr=3e-3, subsets=32, seeds=2, pairs=100,
                             queries_per_set=4, inference_steps=50, pretrain_rows=800, vae_steps=200,
                             pretrain_steps=500, lora_rank=8),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cosine_lr(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))


@torch.no_grad()
def query_losses(denoise, latents: torch.Tensor, conditioning: list, pairs: tuple[torch.Tensor, torch.Tensor],
                 chunk: int = 128) -> torch.Tensor:
    """(Q,) diffusion loss of every query averaged over the fixed pairs. ``denoise(noisy, t, cond)`` predicts the
    noise; ``conditioning[q]`` is the query's conditioning tensor (or None)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps, noise = pairs
    out = torch.zeros(len(latents))
    for q, latent in enumerate(latents):
        total = 0.0
        for start in range(0, len(timesteps), chunk):
            t, eps = timesteps[start:start + chunk], noise[start:start + chunk]
            noisy = scheduler.add_noise(latent[None].expand(len(t), *latent.shape), eps, t)
            cond = None if conditioning[q] is None else conditioning[q].expand(len(t), *conditioning[q].shape[1:])
            total += F.mse_loss(denoise(noisy, t, cond), eps, reduction="sum").item()
        out[q] = total / noise[0].numel() / len(timesteps)
    return out


def write_json(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    temporary = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary))
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


def train_digit_model(pixels: torch.Tensor, steps: int, batch_size: int, lr: float, stream_seed: int,
                      init_seed: int = 0):
    """A fresh digits UNet (initialisation from ``init_seed``) trained on ``pixels`` with a cosine-decayed AdamW;
    noise, timesteps and batch order come from ``stream_seed``."""
    return train_digits(pixels, np.arange(len(pixels)), steps, stream_seed, batch_size, lr, init_seed,
                        cosine_decay=True)


def digits_denoiser(unet):
    return lambda noisy, t, cond: unet(noisy, t).sample


def build_digits(directory: Path, sizes: RetrainSizes) -> dict:
    """Full digits model (stream seed 0) and its generated queries (generation seeds 0 and 1)."""
    pixels, labels = load_digit_rows(sizes.rows, 0)
    start = time.perf_counter()
    unet = train_digit_model(torch.from_numpy(pixels), sizes.steps, sizes.batch_size, sizes.lr, stream_seed=0)
    seconds = time.perf_counter() - start
    log(f"digits full model trained in {seconds:.0f}s")
    pipe = dm.DMinDDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    classifier = digits_classifier()
    queries, read = [], []
    for position, _ in enumerate(QUERY_SETS):
        images = pipe(batch_size=sizes.queries_per_set, generator=torch.Generator().manual_seed(position),
                      num_inference_steps=sizes.inference_steps, output_type="np").images  # (Q, 8, 8, 1) in [0, 1]
        read += [int(r) for r in classifier.predict(images[..., 0].reshape(len(images), -1) * 16.0)]
        queries.append(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    write_safetensors(directory / "model.safetensors", unet.state_dict())
    write_safetensors(directory / "queries.safetensors", {"pixels": torch.cat(queries)})
    return {"query_labels": read, "query_sets": {name: [i * sizes.queries_per_set, (i + 1) * sizes.queries_per_set]
                                                  for i, name in enumerate(QUERY_SETS)},
            "row_labels": labels.tolist(), "full_model_seconds": seconds}


def retrain_digits(directory: Path, sizes: RetrainSizes):
    """Yields (seed, subset) -> losses callables for the loop of :func:`retrain`."""
    pixels = torch.from_numpy(load_digit_rows(sizes.rows, 0)[0])
    queries = load_file(str(directory / "queries.safetensors"))["pixels"]
    pairs = fixed_pairs(sizes.pairs, tuple(queries.shape[1:]))

    def train_and_score(mask: np.ndarray, seed: int) -> tuple[torch.Tensor, dict]:
        keep = torch.from_numpy(np.flatnonzero(mask))
        unet = train_digit_model(pixels[keep], sizes.steps, sizes.batch_size, sizes.lr, TRAIN_SEED_BASE + seed)
        return query_losses(digits_denoiser(unet), queries, [None] * len(queries), pairs), unet.state_dict()

    full = make_digit_unet(0)
    full.load_state_dict(load_file(str(directory / "model.safetensors")))
    full_losses = query_losses(digits_denoiser(full.eval()), queries, [None] * len(queries), pairs)
    return train_and_score, full_losses


# --------------------------------------------------------------------------------------------------
# t2i-lora
# --------------------------------------------------------------------------------------------------


def quality_sizes(sizes: RetrainSizes) -> Sizes:
    """The quality benchmark's sizes for this setting's base pre-training and query generation (seed 0)."""
    return Sizes(t2i_rows=sizes.rows, pretrain_rows=sizes.pretrain_rows, vae_steps=sizes.vae_steps,
                 pretrain_steps=sizes.pretrain_steps, lora_steps=0, lora_rank=sizes.lora_rank, t2i_steps=0,
                 prompts_per_subset=sizes.queries_per_set, digit_rows=0, digit_steps=0, digit_queries=0,
                 inference_steps=sizes.inference_steps)


def lora_state(unet) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in unet.named_parameters() if p.requires_grad}


def train_lora(unet, init: dict, latents: torch.Tensor, conditioning: torch.Tensor, empty: torch.Tensor,
               sizes: RetrainSizes, stream_seed: int, empty_prompts: float = 0.1) -> None:
    """Resets the LoRA to ``init`` and fine-tunes it on (latents, conditioning) as ``quality_setups.train_unet``
    does (10 % empty prompts), with a cosine-decayed learning rate; the stream comes from ``stream_seed``."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    trained = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in init.items():
            trained[name].copy_(value)
    parameters = [trained[name] for name in init]
    optimizer = torch.optim.AdamW(parameters, lr=sizes.lr)
    schedule = cosine_lr(optimizer, sizes.steps)
    generator = torch.Generator().manual_seed(stream_seed)
    unet.train()
    for _ in range(sizes.steps):
        batch = torch.randint(0, len(latents), (sizes.batch_size,), generator=generator)
        noise = torch.randn(latents[batch].shape, generator=generator)
        t = torch.randint(0, 1000, (sizes.batch_size,), generator=generator)
        dropped = (torch.rand(sizes.batch_size, generator=generator) < empty_prompts)[:, None, None]
        prompts = torch.where(dropped, empty, conditioning[batch])
        loss = F.mse_loss(unet(scheduler.add_noise(latents[batch], noise, t), t, encoder_hidden_states=prompts).sample,
                          noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    unet.eval()


def t2i_inputs(pipe, sizes: RetrainSizes):
    """The fine-tuning rows' latents, prompt conditioning and the empty prompt's."""
    family = detect_family(pipe)
    dataset = make_t2i_dataset(sizes.rows, 0)
    with torch.no_grad():
        latents = encode_latents(pipe, to_pixels(dataset["image"]))
        conditioning = torch.cat([sd_prompt(family, t)["encoder_hidden_states"] for t in dataset["text"]])
        empty = sd_prompt(family, "")["encoder_hidden_states"]
    return dataset, family, latents, conditioning, empty


def build_t2i_lora(directory: Path, sizes: RetrainSizes) -> dict:
    """Base, full LoRA (stream seed 1) and queries generated from held-out prompts (generation seeds 0 and 1)."""
    start = time.perf_counter()
    generation = quality_sizes(sizes)
    pipe = pretrained_sd(generation)
    log(f"t2i-lora base pre-trained in {time.perf_counter() - start:.0f}s")
    dataset, family, latents, conditioning, empty = t2i_inputs(pipe, sizes)
    add_training_lora(pipe.unet, sizes.lora_rank, 0)
    write_safetensors(directory / "lora_init.safetensors", lora_state(pipe.unet))
    start = time.perf_counter()
    train_lora(pipe.unet, lora_state(pipe.unet), latents, conditioning, empty, sizes, stream_seed=1)
    seconds = time.perf_counter() - start
    log(f"t2i-lora full LoRA trained in {seconds:.0f}s")
    prompts, images, bounds, count = [], [], {}, 0
    for position, (name, chosen) in enumerate(t2i_prompts(dataset, generation).items()):
        images += generate(pipe, [p for _, p in chosen], generation, position, "pil")
        prompts += chosen
        bounds[name] = [count, count + len(chosen)]
        count += len(chosen)
    with torch.no_grad():
        query_latents = encode_latents(pipe, to_pixels(images))
    state = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    state |= {f"vae.{k}": v for k, v in pipe.vae.state_dict().items()}
    state |= {f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    write_safetensors(directory / "model.safetensors", state)
    write_safetensors(directory / "queries.safetensors", {
        "images": torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])),
        "latents": query_latents})
    return {"query_labels": [s for s, _ in prompts], "query_prompts": [p for _, p in prompts], "query_sets": bounds,
            "row_labels": list(dataset["subset"]), "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
            "full_model_seconds": seconds}


def load_t2i_lora(directory: Path, sizes: RetrainSizes):
    """The full model rebuilt from ``model.safetensors`` (tiny SD skeleton + LoRA adapter, then the saved weights)."""
    setup = json.loads((directory / "setup.json").read_text())
    pipe = tiny_pipeline("sd", dm.DMinStableDiffusionPipeline, seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.register_to_config(scaling_factor=setup["vae_scaling_factor"])
    pipe.unet.requires_grad_(False)
    add_training_lora(pipe.unet, sizes.lora_rank, 0)
    state = load_file(str(directory / "model.safetensors"))
    for prefix, module in (("unet.", pipe.unet), ("vae.", pipe.vae), ("text_encoder.", pipe.text_encoder)):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        module.eval()
    return pipe


def retrain_t2i_lora(directory: Path, sizes: RetrainSizes):
    pipe = load_t2i_lora(directory, sizes)
    setup = json.loads((directory / "setup.json").read_text())
    _, family, latents, conditioning, empty = t2i_inputs(pipe, sizes)
    init = load_file(str(directory / "lora_init.safetensors"))
    queries = load_file(str(directory / "queries.safetensors"))["latents"]
    with torch.no_grad():
        query_cond = [sd_prompt(family, p)["encoder_hidden_states"] for p in setup["query_prompts"]]
    pairs = fixed_pairs(sizes.pairs, tuple(queries.shape[1:]))

    def denoise(noisy, t, cond):
        return pipe.unet(noisy, t, encoder_hidden_states=cond).sample

    def train_and_score(mask: np.ndarray, seed: int) -> tuple[torch.Tensor, dict]:
        keep = torch.from_numpy(np.flatnonzero(mask))
        train_lora(pipe.unet, init, latents[keep], conditioning[keep], empty, sizes, TRAIN_SEED_BASE + seed)
        return query_losses(denoise, queries, query_cond, pairs), lora_state(pipe.unet)

    full_losses = query_losses(denoise, queries, query_cond, pairs)  # before any subset model resets the LoRA
    return train_and_score, full_losses


BUILD = {"digits": build_digits, "t2i-lora": build_t2i_lora}
RETRAIN = {"digits": retrain_digits, "t2i-lora": retrain_t2i_lora}


# --------------------------------------------------------------------------------------------------
# The resumable loop
# --------------------------------------------------------------------------------------------------


def losses_name(reverse: bool) -> str:
    """Each direction of the loop keeps its own file, so two processes can retrain one setting at once."""
    return "losses-reverse.safetensors" if reverse else "losses.safetensors"


def merge_losses(directory: Path) -> None:
    """Folds ``losses-reverse.safetensors`` (a second process, subsets in reverse order) into ``losses.safetensors``."""
    extra = directory / losses_name(True)
    if not extra.exists():
        return
    main, other = load_file(str(directory / losses_name(False))), load_file(str(extra))
    take = other["done"].bool() & ~main["done"].bool()
    main["losses"][take] = other["losses"][take]
    main["done"] = (main["done"].bool() | other["done"].bool()).to(torch.uint8)
    write_safetensors(directory / losses_name(False), main)
    extra.unlink()


def load_losses(directory: Path, sizes: RetrainSizes, num_queries: int,
                reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    path = directory / losses_name(reverse)
    if path.exists():
        saved = load_file(str(path))
        return saved["losses"], saved["done"]
    return torch.full((sizes.seeds, sizes.subsets, num_queries), float("nan")), torch.zeros(
        sizes.seeds, sizes.subsets, dtype=torch.uint8)


def retrain(setting: str, directory: Path, work: Path, until: float | None = None, reverse: bool = False) -> None:
    """Builds the setting once (full model, queries, masks), then trains every (subset, seed) model not done yet,
    subset by subset (so a stopped run leaves complete seed pairs), saving the losses after each model. Stops
    at the wall-clock time ``until`` (seconds since the epoch) if given. ``reverse`` takes the subsets from the
    last (a second process beside a forward one; :func:`merge_losses` joins their files)."""
    sizes = SIZES[setting]
    directory.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not (directory / "setup.json").exists():
        setup = BUILD[setting](directory, sizes)
        setup |= {"sizes": asdict(sizes), "subset_seed": SUBSET_SEED, "pairs_seed": PAIRS_SEED,
                  "train_seeds": [TRAIN_SEED_BASE + s for s in range(sizes.seeds)], "full_model_train_seed":
                  0 if setting == "digits" else 1, "torch": torch.__version__}
        write_safetensors(directory / "masks.safetensors", {"masks": torch.from_numpy(subset_masks(
            sizes.rows, sizes.subsets))})
        write_json(directory / "setup.json", setup)
    setup = json.loads((directory / "setup.json").read_text())
    masks = load_file(str(directory / "masks.safetensors"))["masks"].numpy()
    train_and_score, full_losses = RETRAIN[setting](directory, sizes)
    losses, done = load_losses(directory, sizes, len(setup["query_labels"]), reverse)
    log(f"{setting}: full model's mean query loss {full_losses.mean():.4f}; {int(done.sum())} models done")
    for m in reversed(range(sizes.subsets)) if reverse else range(sizes.subsets):
        for seed in range(sizes.seeds):
            if done[seed, m]:
                continue
            if until is not None and time.time() > until:
                log(f"{setting}: stopping at the time limit")
                return
            start = time.perf_counter()
            losses[seed, m], state = train_and_score(masks[m], seed)
            done[seed, m] = 1
            write_safetensors(directory / losses_name(reverse), {"losses": losses, "done": done,
                                                                 "full_model_losses": full_losses})
            write_safetensors(work / f"model-m{m}-s{seed}.safetensors", state)
            log(f"{setting}: subset {m} seed {seed} in {time.perf_counter() - start:.0f}s, mean loss "
                f"{losses[seed, m].mean():.4f} ({int(done.sum())} done)")


def stop_time(until: str | None) -> float | None:
    """``HH:MM`` (UTC, today, or tomorrow if already past) as seconds since the epoch; None stays None."""
    if until is None:
        return None
    hours, minutes = (int(v) for v in until.split(":"))
    now = time.time()
    midnight = now - now % 86400
    stop = midnight + hours * 3600 + minutes * 60
    return stop if stop > now else stop + 86400

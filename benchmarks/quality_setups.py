"""The settings of the quality benchmark: a trained pipeline, its training rows as model inputs with a label
each, and two sets of generated queries (one to choose a recipe on, one to report on).

* ``t2i-lora``, the paper's setting: a tiny Stable Diffusion whose VAE and UNet are pre-trained on a generic corpus
  (``quality_data.draw_generic``), then a LoRA fine-tuned on the five subsets as diffusers'
  ``train_text_to_image_lora.py`` does (frozen base, ``unet.add_adapter(LoraConfig(...))``); DMin tracks the LoRA.
* ``t2i``: the same tiny UNet trained in full from random initialisation on the subsets (random VAE).
* ``digits``: an unconditional DDPM on scikit-learn's 8x8 digits; a classifier labels the generated digits.
* ``dreambooth``: ``train_dreambooth_lora.py`` with prior preservation on the ``t2i-lora`` base: a few instance
  sets, each photo captioned with its one instance prompt, among rows that carry only their class prompt.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from peft import LoraConfig

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher, PreparedExample
from dmin_diffusers.inputs import preprocess_image
from dmin_diffusers.resolution import resolve_config
import common  # noqa: F401  (puts tests/ on the path for tiny_models)
from quality_data import (EVALUATED, INSTANCES, digits_classifier, heldout_prompts, load_digit_rows,
                          make_dreambooth_dataset, make_generic_dataset, make_t2i_dataset)
from tiny_models import tiny_pipeline

QUERY_SETS = ("selection", "evaluation")  # recipes are chosen on the first and reported on the second


@dataclass
class Sizes:
    """Sizes of one run (``--quick`` or full)."""

    t2i_rows: int
    pretrain_rows: int
    vae_steps: int
    pretrain_steps: int
    lora_steps: int
    lora_rank: int
    t2i_steps: int
    prompts_per_subset: int
    digit_rows: int
    digit_steps: int
    digit_queries: int
    inference_steps: int
    guidance_scale: float = 4.0
    seed: int = 0
    class_rows: int = 20  # dreambooth: prior-preservation rows per class


@dataclass
class QuerySet:
    """Generated queries, the label each should be attributed to, and the baselines' similarity matrices."""

    examples: list[PreparedExample]
    labels: list
    similarities: dict[str, torch.Tensor]  # baseline name -> (queries, rows) cosine similarities


@dataclass
class Setup:
    """A trained pipeline with its labelled training rows and query sets."""

    mode: str
    pipe: object
    rows: list[PreparedExample]
    row_labels: np.ndarray
    groups: tuple[str, ...]  # the labels reported one by one (t2i subsets), or one group for every query
    query_sets: dict[str, QuerySet]
    notes: list[str] = field(default_factory=list)
    digit_pixels: torch.Tensor | None = None  # for the counterfactual retraining
    self_rows: list[int] = field(default_factory=list)  # rows attributed with their own prompt (self-retrieval)

    def group_of(self, label) -> str:
        return label if label in self.groups else self.groups[0]


def cosine(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return F.normalize(queries.flatten(1), dim=1) @ F.normalize(rows.flatten(1), dim=1).T


def preparer(pipe) -> GradientSketcher:
    """A sketcher used only for :meth:`GradientSketcher.prepare` (inputs do not depend on the recipe)."""
    family = detect_family(pipe)
    return GradientSketcher(family, resolve_config(dm.DMinConfig(num_timesteps=1, projection_dim=2), family))


# --------------------------------------------------------------------------------------------------
# Training the tiny text-to-image models
# --------------------------------------------------------------------------------------------------


def to_pixels(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                        for im in images])


def set_latent_scale(pipe, pixels: torch.Tensor) -> None:
    """Sets the VAE's ``scaling_factor`` to 1 / std of the latents of ``pixels``, as Stable Diffusion's 0.18215 was
    chosen: the UNet then learns unit-variance latents, the scale generation starts from."""
    with torch.no_grad():
        raw = pipe.vae.encode(pixels).latent_dist.mean
    pipe.vae.register_to_config(scaling_factor=float(1 / raw.std()))


def encode_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    return detect_family(pipe).encode_image(pixels)


def train_vae(vae, pixels: torch.Tensor, steps: int, seed: int, batch_size: int = 32, kl_weight: float = 1e-6) -> None:
    """Trains the tiny VAE as an autoencoder (reconstruction of a posterior sample, a small KL term)."""
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    vae.requires_grad_(False).eval()
    print(f"  VAE reconstruction loss (last batch) {loss.item():.4f}", flush=True)


def sd_prompt(family, prompt: str) -> dict[str, torch.Tensor]:
    """A Stable Diffusion prompt's conditioning (SD's needs neither the image's crop nor the config)."""
    return family.encode_prompt(prompt, geometry=None, config=None)


def train_unet(pipe, latents: torch.Tensor, captions: list[str], steps: int, seed: int, lr: float,
               batch_size: int = 16, empty_prompts: float = 0.1) -> None:
    """diffusers' text-to-image training loop on the UNet's trainable parameters (all of them, or the LoRA), with
    ``--proportion_empty_prompts 0.1`` so that classifier-free guidance works at generation."""
    family = detect_family(pipe)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        conditioning = torch.cat([sd_prompt(family, t)["encoder_hidden_states"] for t in captions])
        empty = sd_prompt(family, "")["encoder_hidden_states"]
    unet = pipe.unet.train()
    trained = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr)
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
    print(f"  UNet training loss (last batch) {loss.item():.3f} ({sum(p.numel() for p in trained):,} parameters)",
          flush=True)


def add_training_lora(unet, rank: int, seed: int) -> None:
    """The LoRA of diffusers' ``train_text_to_image_lora.py``: frozen base, adapter on the attention projections
    (its random initialisation seeded, so a run is reproducible)."""
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))


def t2i_prompts(dataset, sizes: Sizes) -> dict[str, list[tuple[str, str]]]:
    """(subset, prompt) of each query set: held-out captions, the evaluation set's disjoint from the selection's."""
    excluded = set(dataset["text"])
    prompts = {}
    for position, name in enumerate(QUERY_SETS):
        chosen = [(subset, p) for subset in EVALUATED
                  for p in heldout_prompts(subset, sizes.prompts_per_subset, excluded, seed=1 + position)]
        excluded |= {p for _, p in chosen}
        prompts[name] = chosen
    return prompts


def generate(pipe, prompts: list[str], sizes: Sizes, seed: int, output_type: str):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=sizes.inference_steps, generator=generator, output_type=output_type,
                guidance_scale=sizes.guidance_scale).images


# --------------------------------------------------------------------------------------------------
# The settings
# --------------------------------------------------------------------------------------------------


def pretrained_sd(sizes: Sizes):
    """The tiny Stable Diffusion with its VAE and UNet pre-trained on the generic corpus (the users' base model)."""
    seed = sizes.seed
    pipe = tiny_pipeline("sd", dm.DMinStableDiffusionPipeline, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    corpus_images, corpus_captions = make_generic_dataset(sizes.pretrain_rows, seed)
    corpus = to_pixels(corpus_images)
    start = time.perf_counter()
    train_vae(pipe.vae, corpus, sizes.vae_steps, seed)
    set_latent_scale(pipe, corpus)
    pipe.unet.requires_grad_(True)
    train_unet(pipe, encode_latents(pipe, corpus), corpus_captions, sizes.pretrain_steps, seed, lr=1e-3)
    print(f"  pre-trained in {time.perf_counter() - start:.0f}s", flush=True)
    return pipe


def fine_tune_lora(pipe, dataset, sizes: Sizes) -> None:
    """diffusers' LoRA fine-tuning (``add_training_lora``, then ``train_unet``) on a dataset's images and texts."""
    add_training_lora(pipe.unet, sizes.lora_rank, sizes.seed)
    start = time.perf_counter()
    train_unet(pipe, encode_latents(pipe, to_pixels(dataset["image"])), dataset["text"], sizes.lora_steps,
               sizes.seed + 1, lr=1e-3)
    print(f"  LoRA fine-tuned in {time.perf_counter() - start:.0f}s", flush=True)


def image_query_sets(pipe, dataset, rows: list[PreparedExample], prompts: dict[str, list[tuple[str, str]]],
                     sizes: Sizes) -> dict[str, QuerySet]:
    """Generated images (PIL, encoded by the VAE as any user's image) of each query set's (label, prompt) pairs,
    with the pixel and latent similarity baselines; query set ``i`` is generated from seed ``sizes.seed + i``."""
    prep = preparer(pipe)
    resolution = prep.config.resolution
    row_pixels = torch.cat([preprocess_image(im, resolution) for im in dataset["image"]])
    row_latents = torch.cat([r.latents for r in rows])
    query_sets = {}
    for position, (name, chosen) in enumerate(prompts.items()):
        images = generate(pipe, [p for _, p in chosen], sizes, sizes.seed + position, "pil")
        examples = [prep.prepare(image, prompt) for image, (_, prompt) in zip(images, chosen)]
        pixels = torch.cat([preprocess_image(im, resolution) for im in images])
        query_sets[name] = QuerySet(examples, [s for s, _ in chosen], {
            "pixel similarity (cosine)": cosine(pixels, row_pixels),
            "latent similarity (cosine)": cosine(torch.cat([e.latents for e in examples]), row_latents)})
    return query_sets


def build_t2i_lora(sizes: Sizes) -> Setup:
    """The paper's setting: pre-trained VAE and UNet, LoRA fine-tuning; queries are generated images (PIL)."""
    pipe = pretrained_sd(sizes)
    dataset = make_t2i_dataset(sizes.t2i_rows, sizes.seed)
    fine_tune_lora(pipe, dataset, sizes)
    prep = preparer(pipe)
    rows = [prep.prepare(r["image"], r["text"]) for r in dataset]
    query_sets = image_query_sets(pipe, dataset, rows, t2i_prompts(dataset, sizes), sizes)
    setup = Setup("t2i-lora", pipe, rows, np.asarray(dataset["subset"]), EVALUATED, query_sets)
    setup.notes.append(
        f"t2i-lora: VAE ({sizes.vae_steps} steps) and UNet ({sizes.pretrain_steps} steps) pre-trained on "
        f"{sizes.pretrain_rows} generic images; LoRA rank {sizes.lora_rank} on to_q/to_k/to_v/to_out.0 fine-tuned "
        f"{sizes.lora_steps} steps on the {sizes.t2i_rows} rows; queries are the generated images (PIL), encoded "
        "by the VAE as any user's image")
    return setup


def build_dreambooth(sizes: Sizes) -> Setup:
    """DreamBooth LoRA with prior preservation on the pre-trained base: instance sets of 5-20 photos of one object,
    each photo captioned with its instance prompt, among class rows captioned with their class prompt. Queries are
    generations of each instance prompt (the prompt cannot be held out: the query sets differ in generation seed);
    every instance row is also attributed with its own prompt (self-retrieval)."""
    pipe = pretrained_sd(sizes)
    dataset = make_dreambooth_dataset(sizes.class_rows, sizes.seed)
    fine_tune_lora(pipe, dataset, sizes)
    prep = preparer(pipe)
    rows = [prep.prepare(r["image"], r["text"]) for r in dataset]
    chosen = [(name, prompt) for name, (_, _, prompt, _) in INSTANCES.items() for _ in range(sizes.prompts_per_subset)]
    query_sets = image_query_sets(pipe, dataset, rows, dict.fromkeys(QUERY_SETS, chosen), sizes)
    labels = np.asarray(dataset["subset"])
    setup = Setup("dreambooth", pipe, rows, labels, tuple(INSTANCES), query_sets,
                  self_rows=[int(i) for i in np.flatnonzero(np.isin(labels, list(INSTANCES)))])
    sets = ", ".join(f"{name} ({count} photos)" for name, (_, count, _, _) in INSTANCES.items())
    setup.notes.append(
        f"dreambooth: the t2i-lora base; LoRA rank {sizes.lora_rank} fine-tuned {sizes.lora_steps} steps on the "
        f"instance sets {sets}, each photo captioned with its instance prompt, among {sizes.class_rows} rows per class "
        "captioned with the class prompt (prior preservation); queries: generations of each instance prompt, "
        "the query sets differing in generation seed; self-retrieval over every instance row")
    return setup


def build_t2i(sizes: Sizes) -> Setup:
    """The tiny UNet trained in full from random initialisation; queries are the generated latents."""
    seed = sizes.seed
    dataset = make_t2i_dataset(sizes.t2i_rows, seed)
    pipe = tiny_pipeline("sd", dm.DMinStableDiffusionPipeline, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    pixels = to_pixels(dataset["image"])
    set_latent_scale(pipe, pixels)
    pipe.unet.requires_grad_(True)
    start = time.perf_counter()
    train_unet(pipe, encode_latents(pipe, pixels), dataset["text"], sizes.t2i_steps, seed, lr=1e-3)
    print(f"  trained in {time.perf_counter() - start:.0f}s", flush=True)
    prep = preparer(pipe)
    family = prep.family
    rows = [prep.prepare(r["image"], r["text"]) for r in dataset]
    row_latents = torch.cat([r.latents for r in rows])
    query_sets = {}
    for position, (name, chosen) in enumerate(t2i_prompts(dataset, sizes).items()):
        # The tiny VAE is random-init and cannot round-trip an image, so queries are the generated latents (what
        # a faithful VAE would encode the decoded image back to), with the prompt encoded as for the rows.
        latents = generate(pipe, [p for _, p in chosen], sizes, seed + position, "latent")
        examples = [PreparedExample(latents=lat[None], conditioning=sd_prompt(family, p))
                    for lat, (_, p) in zip(latents, chosen)]
        query_sets[name] = QuerySet(examples, [s for s, _ in chosen],
                                    {"latent similarity (cosine)": cosine(latents, row_latents)})
    setup = Setup("t2i", pipe, rows, np.asarray(dataset["subset"]), EVALUATED, query_sets)
    setup.notes.append(f"t2i: the whole tiny UNet trained {sizes.t2i_steps} steps from random initialisation on the "
                       f"{sizes.t2i_rows} rows (random VAE; queries are the generated latents)")
    return setup


def make_digit_unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                       norm_num_groups=8, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def train_digits(pixels: torch.Tensor, keep: np.ndarray, steps: int, seed: int, batch_size: int = 32,
                 lr: float = 2e-3, init_seed: int | None = None, cosine_decay: bool = False) -> UNet2DModel:
    """Trains a fresh UNet on ``pixels[keep]``; its initialisation comes from ``init_seed`` (default ``seed``) and
    the noise, timesteps and batch order from ``seed``; ``cosine_decay`` anneals the learning rate to 0."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet = make_digit_unet(seed if init_seed is None else init_seed).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
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
        if cosine_decay:
            decay.step()
    return unet.eval()


def build_digits(sizes: Sizes) -> Setup:
    """DDPM on digits; each query's label is the class a classifier reads from the generated digit."""
    pixels_np, labels = load_digit_rows(sizes.digit_rows, sizes.seed)
    pixels = torch.from_numpy(pixels_np)
    start = time.perf_counter()
    unet = train_digits(pixels, np.arange(len(labels)), sizes.digit_steps, sizes.seed)
    print(f"  digits trained in {time.perf_counter() - start:.0f}s", flush=True)
    pipe = dm.DMinDDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    classifier = digits_classifier()
    query_sets, read_labels = {}, []
    for position, name in enumerate(QUERY_SETS):
        generated = pipe(batch_size=sizes.digit_queries, generator=torch.Generator().manual_seed(sizes.seed + position),
                         num_inference_steps=sizes.inference_steps, output_type="np").images  # (Q, 8, 8, 1) in [0, 1]
        read = classifier.predict(generated[..., 0].reshape(len(generated), -1) * 16.0)
        read_labels.append(sorted(int(r) for r in read))
        query_pixels = torch.from_numpy(generated).permute(0, 3, 1, 2) * 2 - 1
        examples = [PreparedExample(latents=x[None], conditioning={}) for x in query_pixels]  # already model inputs
        query_sets[name] = QuerySet(examples, [int(r) for r in read],
                                    {"pixel similarity (cosine)": cosine(query_pixels, pixels)})
    rows = [PreparedExample(latents=x[None], conditioning={}) for x in pixels]
    setup = Setup("digits", pipe, rows, labels, ("digits",), query_sets, digit_pixels=pixels)
    setup.notes.append(f"digits: {sizes.digit_rows} rows, DDPM trained {sizes.digit_steps} steps; generated digits "
                       f"read as {read_labels[0]} (selection) and {read_labels[1]} (evaluation)")
    return setup


BUILDERS = {"t2i-lora": build_t2i_lora, "t2i": build_t2i, "digits": build_digits, "dreambooth": build_dreambooth}
#: the pipeline family each setting's model belongs to (what decides the package's default preconditioning)
SETTING_FAMILIES = {"t2i-lora": "stable-diffusion", "t2i": "stable-diffusion", "dreambooth": "stable-diffusion",
                    "digits": "ddpm"}

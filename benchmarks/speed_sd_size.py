"""Caching cost on a model the size users fine-tune: Stable Diffusion 1.5's UNet (860M parameters), built from its
published config with random weights (no download), at 64x64 latents (512x512 images).

For LoRA rank 4 and 64 and for full-parameter tracking, per (row, timestep): a plain forward + backward of the
same model and input (gradients into ``.grad``), DMin's one-at-a-time path (``sketch_sequential``), and, where
the per-sample gradients fit the batch budget, DMin's batched path against a plain forward + backward of the same
batch. Peak memory is the resident (CPU) or allocated (CUDA) memory added while each measurement ran. Used by
``speed.py --sd-size``.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher, PreparedExample
from dmin_diffusers.output_functions import output_function_named
from dmin_diffusers.resolution import resolve_config

from common import best_time, markdown_table, status_kib
from tiny_models import add_lora, make_caption_dataset, tiny_stable_diffusion_components

GIB = 2**30
ATTRIBUTE_ROWS = 4  # rows of the index that ``attribute()`` is timed on

#: Stable Diffusion 1.5's UNet config (runwayml/stable-diffusion-v1-5, unet/config.json), the fields that differ
#: from diffusers' defaults
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}


def sd15_pipeline(lora_rank: int | None, device: str) -> dm.DMinStableDiffusionPipeline:
    """A Stable Diffusion pipeline whose UNet is SD 1.5's (random weights); the VAE and text encoder are tiny,
    since the benchmark feeds latents and prompt embeddings directly (``attribute`` encodes its image with the tiny
    VAE to the same 64x64 latents)."""
    components = tiny_stable_diffusion_components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    if lora_rank is not None:
        add_lora(unet, rank=lora_rank)
    components["unet"] = unet
    tiny_text = components["text_encoder"].config  # the UNet attends to 768-wide prompt embeddings
    components["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_dict({**tiny_text.to_dict(), "hidden_size": 768}))
    return dm.DMinStableDiffusionPipeline(**components, requires_safety_checker=False).to(device)


def timed_peak(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """``(seconds, peak GiB added)`` of one run of ``fn`` in this process."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: large blocks go back to the system when freed
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = (status_kib("VmRSS") or 0) * 1024
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else (status_kib("VmHWM") or 0) * 1024
    return seconds, max(peak - before, 0) / GIB


@contextmanager
def training_only(sketcher: GradientSketcher) -> Iterator[None]:
    """Gradients on for the sketcher's tracked parameters only, as a script training just those (a LoRA, or the
    whole model) would have them, the denoiser in eval mode as DMin runs it, no ``.grad`` before or after; the
    parameters' flags and the mode are restored afterwards."""
    denoiser = sketcher.family.denoiser
    tracked = [p for _, p in sketcher.parameters]
    flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    was_training = denoiser.training
    try:
        denoiser.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for p in tracked:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            yield
    finally:
        for p in tracked:
            p.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
        denoiser.train(was_training)


def denoiser_batch(sketcher: GradientSketcher, samples: list[tuple[PreparedExample, int]]
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``(noisy, model_timestep, conditioning, target)`` of ``(example, timestep position)`` samples in one batch,
    from the public pieces a training step uses: each example noised with the sketcher's fixed noise
    (``noise_draws`` copies) at the config's timestep by the training objective."""
    noisy, timesteps, conditioning, targets = [], [], [], []
    for example, position in samples:
        noise = sketcher.noise(example.latents, position)
        noised = sketcher.objective.noised(example.latents.expand_as(noise), noise, sketcher.config.timesteps[position])
        noisy.append(noised.noisy)
        timesteps.append(noised.model_timestep)
        targets.append(noised.target.float())
        conditioning.append({key: value.expand(len(noise), *value.shape[1:])
                             for key, value in example.conditioning.items()})
    batched = {key: torch.cat([c[key] for c in conditioning]) for key in conditioning[0]}
    return torch.cat(noisy), torch.cat(timesteps), batched, torch.cat(targets)


def plain_steps(sketcher: GradientSketcher, examples: list[PreparedExample], batch: int) -> None:
    """Plain forward + backward passes over every (example, timestep) sample of the config, ``batch`` samples per
    pass: the family's prediction call, the sum of the samples' outputs (the config's output function,
    :mod:`~dmin_diffusers.output_functions`), gradients accumulated into ``.grad`` as a training step would, then
    dropped."""
    samples = [(e, p) for e in examples for p in range(len(sketcher.config.timesteps))]
    family = sketcher.family
    output_function = output_function_named(sketcher.config.output_function).function
    with training_only(sketcher):
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            noisy, model_timestep, conditioning, target = denoiser_batch(sketcher, chunk)
            prediction = family.predict(noisy.to(family.denoiser.dtype), model_timestep, conditioning).float()
            per_sample = (len(chunk), -1)  # (samples, noise_draws, ...), as output functions take them
            output_function(prediction.unflatten(0, per_sample), target.unflatten(0, per_sample)).sum().backward()


def attribute_latency(pipe, config: dm.DMinConfig, rows: int, batch_bytes: int) -> tuple[float, float, float]:
    """``(seconds to cache rows, first attribute(), later attribute())`` on an index of ``rows`` generated rows."""
    dataset = make_caption_dataset(rows, size=config.resolution)
    with tempfile.TemporaryDirectory(prefix="dmin-sd-size-") as directory:
        start = time.perf_counter()
        pipe.build_attribution_index(dataset, directory, config=config, progress=False, batch_bytes=batch_bytes)
        build = time.perf_counter() - start
        query, prompt = dataset[0]["image"], dataset[0]["text"]
        first = best_time(lambda: pipe.attribute(query, prompt, top_k=rows), 1)
        later = best_time(lambda: pipe.attribute(query, prompt, top_k=rows), 3)
    return build, first, later


def measure(name: str, rank: int | None, device: str, num_timesteps: int, batch_gib: float) -> list[str]:
    """One row of the table, measured in this process."""
    pipe = sd15_pipeline(rank, device)
    family = detect_family(pipe)
    config = resolve_config(dm.DMinConfig(num_timesteps=num_timesteps, projection_dim=4096), family)
    batch_bytes = int(batch_gib * GIB)
    start = time.perf_counter()
    sketcher = GradientSketcher(family, config, batch_bytes=batch_bytes)
    codes_kept = sketcher.projector.prepare_codes(device)
    code_seconds = time.perf_counter() - start
    with_vmap = GradientSketcher(family, config, batch_bytes=batch_bytes, per_sample="vmap",
                                 projector=sketcher.projector)
    generator = torch.Generator().manual_seed(0)
    example = PreparedExample(
        latents=torch.randn(1, 4, 64, 64, generator=generator).to(device),
        conditioning={"encoder_hidden_states": torch.randn(1, 77, 768, generator=generator).to(device)},
    )
    per = 1.0 / num_timesteps
    plain, plain_peak = timed_peak(lambda: plain_steps(sketcher, [example], 1), device)
    sequential, sequential_peak = timed_peak(lambda: sketcher.sketch_sequential(example), device)
    row = [name, f"{sketcher.projector.total:,}", f"{plain * per:.2f}", f"{plain_peak:.2f}", f"{sequential * per:.2f}",
           f"{sequential_peak:.2f}", f"{sequential / plain:.2f}x"]
    for batched_sketcher in (sketcher, with_vmap):
        batched_sketcher.sketch_many([example])  # measures the batch size (and checks the per-layer path)
        batch = min(batched_sketcher.batch_samples, num_timesteps)
        if batch > 1:  # the row's timesteps go in batches of this size
            plain_batch, _ = timed_peak(lambda: plain_steps(sketcher, [example], batch), device)
            batched, peak = timed_peak(lambda: batched_sketcher.sketch_many([example]), device)
            row += [str(batch), f"{batched * per:.2f}", f"{peak:.2f}", f"{batched / plain_batch:.2f}x",
                    f"{sequential / batched:.2f}x"]
        else:
            row += ["1 (over the budget)", "", "", "", ""]
    build, first, later = attribute_latency(pipe, config, ATTRIBUTE_ROWS, batch_bytes)
    row += [f"{build / (ATTRIBUTE_ROWS * num_timesteps):.2f}", f"{first:.2f}", f"{later:.2f}",
            f"{4 * sketcher.projector.total / GIB:.2f} GiB, "
            + (f"{code_seconds:.1f} s" if codes_kept else "over the budget: derived for every gradient")]
    print(row, flush=True)
    return row


def sd_size_table(device: str = "cpu", num_timesteps: int = 2, batch_gib: float = 12.0) -> str:
    """The SD-size caching table (one row, ``num_timesteps`` timesteps, K = 4096)."""
    # each row in a fresh process: a model that is dropped is not always freed at once (3.2 GiB each), and the
    # code cache of the next row is sized from the memory then available
    context = multiprocessing.get_context("spawn")
    rows = []
    for name, rank in (("LoRA r4", 4), ("LoRA r64", 64), ("full (all 860M parameters)", None)):
        with context.Pool(1, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)) as pool:
            rows.append(pool.apply(measure, (name, rank, device, num_timesteps, batch_gib)))
    header = (
        f"Stable Diffusion 1.5's UNet (random weights from its config), 64x64 latents, one row, T = {num_timesteps} "
        f"timesteps, K = 4096, device {device}, torch threads {torch.get_num_threads()}; one run of each, times "
        f"per (row, timestep). Batch budget {batch_gib:g} GiB (per sample, measured on the row: the activations "
        "autograd keeps, and the per-sample gradients: every parameter's with vmap, one layer's at a time per "
        "layer). Batched paths: per layer (the default) and `torch.func.vmap` (before issue 20), each against a "
        "plain forward + backward of the same batch. Peak: memory added while the measurement ran (resident "
        f"memory on the CPU, allocated memory on CUDA). `attribute()`: an index of {ATTRIBUTE_ROWS} rows built "
        "with `build_attribution_index` (caching time per (row, timestep)), then exact top-k queries of a row.\n\n"
    )
    paths = [h for path in ("per layer", "vmap") for h in (
        f"{path}: batch (samples)", f"DMin {path} (s)", "peak (GiB)", f"{path} / plain batch",
        f"one-at-a-time / {path}")]
    return header + markdown_table(
        ["tracked", "tracked params", "plain fwd+bwd (s)", "peak (GiB)", "DMin one-at-a-time (s)", "peak (GiB)",
         "one-at-a-time / plain", *paths, "build_attribution_index (s)", "first attribute() (s)",
         "later attribute() (s)", "compressor codes (size, derivation)"],
        rows,
    )

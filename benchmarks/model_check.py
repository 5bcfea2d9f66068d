"""The cost of checking, at every ``attribute`` call, that the pipeline is still the model its index was built on,
on a pipeline the size users fine-tune: Stable Diffusion 1.5's UNet + LoRA r4, VAE and CLIP text encoder, built from
their published configs with random weights (no download).

Prints, one thread: the cheap per-query check (:func:`dmin_diffusers.model_state.pipeline_state`), the full check
that runs when the state changed (:func:`dmin_diffusers.resolution.check_config_matches`), and one plain forward +
backward of the UNet at 64x64 latents (a query pays ``T`` of them) as the baseline, measured in the same run.

    python benchmarks/model_check.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family
from dmin_diffusers.model_state import pipeline_state
from dmin_diffusers.resolution import check_config_matches, resolve_config, select_tracked_parameters

from speed_sd_size import sd15_pipeline

#: Stable Diffusion 1.5's VAE and text encoder (runwayml/stable-diffusion-v1-5 configs, fields that differ from the
#: classes' defaults)
SD15_VAE_CONFIG = {
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4, "sample_size": 512,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_TEXT_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77}


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = sd15_pipeline(lora_rank=4, device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.vae = AutoencoderKL(**SD15_VAE_CONFIG).eval()
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)).eval()
    family = detect_family(pipe)
    unet = family.denoiser
    config = resolve_config(dm.DMinConfig(num_timesteps=10, projection_dim=4096, resolution=512), family)
    tracked = select_tracked_parameters(unet)

    cheap = median_seconds(lambda: pipeline_state(pipe, unet, tracked), args.repeats)
    full = median_seconds(lambda: check_config_matches(config, family), max(1, args.repeats // 2))
    latents = torch.randn(1, 4, 64, 64)
    hidden = torch.randn(1, 77, 768)

    def forward_backward() -> None:
        unet(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample.square().mean().backward()
        unet.zero_grad(set_to_none=True)

    step = median_seconds(forward_backward, max(1, args.repeats // 2))
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in
              (("unet", unet), ("vae", pipe.vae), ("text encoder", pipe.text_encoder))}
    print(f"SD 1.5 sizes: {', '.join(f'{name} {count / 1e6:.0f}M' for name, count in counts.items())}; "
          f"{len(tracked)} LoRA tensors tracked; torch threads 1; median of {args.repeats}")
    print("| what | seconds | vs one forward + backward |")
    print("|---|---|---|")
    for what, seconds in (("per-query state check (pipeline_state)", cheap),
                          ("full check when the state changed (check_config_matches)", full),
                          ("one UNet forward + backward, 64x64 latents (a query runs T of them)", step)):
        print(f"| {what} | {seconds:.4f} | {seconds / step:.3f}x |")


if __name__ == "__main__":
    main()

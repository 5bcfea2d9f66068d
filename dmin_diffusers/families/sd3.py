"""Stable Diffusion 3 (``StableDiffusion3Pipeline``): MMDiT transformer, two CLIP text encoders and T5."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from .base import LatentFamily
from .registry import register_family


@register_family
class StableDiffusion3Family(LatentFamily):
    """Flow matching on the scheduler's (shifted) sigmas; the T5 prompt is cut at 77 tokens as the training
    scripts do by default (the pipeline's own default is 256)."""

    name = "sd3"
    pipeline_classes = (StableDiffusion3Pipeline,)
    denoiser_name = "transformer"
    training_objective = "flow_matching"  # its scheduler config names no prediction_type
    default_max_sequence_length = 77
    training_scripts = ("dreambooth/train_dreambooth_sd3.py", "dreambooth/train_dreambooth_lora_sd3.py")

    @torch.no_grad()
    def encode_prompt(self, prompt, geometry, config):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=config.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, noisy, timestep, conditioning):
        dtype = self.denoiser.dtype
        return self.denoiser(
            hidden_states=noisy,
            timestep=timestep,
            encoder_hidden_states=conditioning["encoder_hidden_states"].to(dtype),
            pooled_projections=conditioning["pooled_projections"].to(dtype),
        ).sample

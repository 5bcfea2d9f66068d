"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): UNet, one CLIP text encoder, VAE."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from .base import LatentFamily
from .registry import register_family


@register_family
class StableDiffusionFamily(LatentFamily):
    """Epsilon, v-prediction or sample objectives on the scheduler's training noise schedule."""

    name = "stable-diffusion"
    pipeline_classes = (StableDiffusionPipeline,)
    training_scripts = ("text_to_image/train_text_to_image.py", "text_to_image/train_text_to_image_lora.py",
                        "dreambooth/train_dreambooth_lora.py")

    @torch.no_grad()
    def encode_prompt(self, prompt, geometry, config):
        embeds, _ = self.pipeline.encode_prompt(prompt, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def predict(self, noisy, timestep, conditioning):
        hidden = conditioning["encoder_hidden_states"].to(self.denoiser.dtype)
        return self.denoiser(noisy, timestep, encoder_hidden_states=hidden).sample

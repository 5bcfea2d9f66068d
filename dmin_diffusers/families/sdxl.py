"""Stable Diffusion XL (``StableDiffusionXLPipeline``): UNet, two CLIP text encoders, pooled prompt embeddings
and the size-and-crop conditioning ``add_time_ids``."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from .base import LatentFamily
from .registry import register_family


@register_family
class StableDiffusionXLFamily(LatentFamily):
    """Epsilon or v-prediction on the scheduler's training noise schedule, conditioned as SDXL's training scripts
    condition each image: ``time_ids`` = its original ``(height, width)``, the ``(top, left)`` of its crop and the
    target ``(resolution, resolution)``. A generated image (a query) has its own size and no crop, which is what
    the pipeline conditioned it on by default."""

    name = "sdxl"
    pipeline_classes = (StableDiffusionXLPipeline,)
    training_scripts = ("text_to_image/train_text_to_image_sdxl.py", "text_to_image/train_text_to_image_lora_sdxl.py",
                        "dreambooth/train_dreambooth_lora_sdxl.py")

    @torch.no_grad()
    def encode_prompt(self, prompt, geometry, config):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        time_ids = [*geometry.original_size, *geometry.crop_top_left, *geometry.target_size]
        return {
            "encoder_hidden_states": embeds,
            "text_embeds": pooled,
            "time_ids": torch.tensor([time_ids], dtype=torch.float32, device=embeds.device),
        }

    def predict(self, noisy, timestep, conditioning):
        dtype = self.denoiser.dtype
        added = {"text_embeds": conditioning["text_embeds"].to(dtype), "time_ids": conditioning["time_ids"].to(dtype)}
        hidden = conditioning["encoder_hidden_states"].to(dtype)
        return self.denoiser(noisy, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

"""Flux.1 (``FluxPipeline``): a flow-matching transformer on 2x2-packed latents, with CLIP (pooled) and T5
prompts and, in the guidance-distilled models (Flux.1 dev), a guidance embedding."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from .base import LatentFamily
from .registry import register_family

#: the guidance value diffusers' Flux training scripts give a guidance-embedding transformer (``--guidance_scale``)
DEFAULT_TRAINING_GUIDANCE = 3.5


@register_family
class FluxFamily(LatentFamily):
    """Flow matching on the scheduler's training sigmas as ``train_dreambooth_lora_flux.py`` takes them (its
    static ``shift``; a scheduler with dynamic shifting trains on the unshifted sigmas), the transformer called
    with ``timestep / 1000``, packed latents and their position ids, and ``guidance_scale`` when it has a
    guidance embedding. The prediction is unpacked before the objective compares it with the target."""

    name = "flux"
    pipeline_classes = (FluxPipeline,)
    denoiser_name = "transformer"
    training_objective = "flow_matching"  # its scheduler config names no prediction_type
    default_max_sequence_length = 512
    training_scripts = ("dreambooth/train_dreambooth_flux.py", "dreambooth/train_dreambooth_lora_flux.py")

    @property
    def resolution_multiple(self) -> int:
        return 2 * int(self.pipeline.vae_scale_factor)  # latents are packed in 2x2 patches

    def native_resolution(self) -> int:
        return int(self.pipeline.default_sample_size) * int(self.pipeline.vae_scale_factor)

    def resolved_settings(self, config):
        settings = super().resolved_settings(config)
        if self.denoiser.config.guidance_embeds:
            given = config.guidance_scale
            settings["guidance_scale"] = DEFAULT_TRAINING_GUIDANCE if given is None else given
        return settings

    @torch.no_grad()
    def encode_prompt(self, prompt, geometry, config):
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt, prompt_2=None, device=self.device, max_sequence_length=config.max_sequence_length
        )
        conditioning = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if config.guidance_scale is not None:
            conditioning["guidance"] = torch.tensor([float(config.guidance_scale)], device=embeds.device)
        return conditioning

    def predict(self, noisy, timestep, conditioning):
        batch, channels, height, width = noisy.shape
        dtype, device = self.denoiser.dtype, noisy.device
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        guidance = conditioning.get("guidance")
        prediction = self.denoiser(
            hidden_states=packed.to(dtype),
            timestep=timestep / 1000,
            guidance=None if guidance is None else guidance.to(dtype),
            pooled_projections=conditioning["pooled_projections"].to(dtype),
            encoder_hidden_states=conditioning["encoder_hidden_states"].to(dtype),
            txt_ids=torch.zeros(conditioning["encoder_hidden_states"].shape[1], 3, device=device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype),
        ).sample
        scale = int(self.pipeline.vae_scale_factor)
        return FluxPipeline._unpack_latents(prediction, height * scale, width * scale, scale)

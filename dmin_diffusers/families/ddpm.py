"""Unconditional pixel-space diffusion (``DDPMPipeline``, ``DDIMPipeline``)."""

from __future__ import annotations

import torch
from diffusers import DDIMPipeline, DDPMPipeline

from .base import PipelineFamily, sample_size
from .registry import register_family


@register_family
class DDPMFamily(PipelineFamily):
    """A ``UNet2DModel`` trained on pixels, without a prompt."""

    name = "ddpm"
    pipeline_classes = (DDPMPipeline, DDIMPipeline)
    takes_prompt = False
    input_models = ()  # pixels go straight into the UNet
    training_scripts = ("unconditional_image_generation/train_unconditional.py",)

    def native_resolution(self) -> int:
        return sample_size(self.denoiser.config)

    @property
    def image_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def encode_image(self, pixels):
        return pixels.to(self.device, torch.float32)

    def predict(self, noisy, timestep, conditioning):
        return self.denoiser(noisy, timestep).sample

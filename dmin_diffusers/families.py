"""How each supported pipeline family turns an image and a prompt into denoiser inputs and a prediction.

A family is detected from a pipeline's components, so subclasses and custom pipelines with the same
components work too.
"""

from __future__ import annotations

from typing import Any

import torch

SD3_DEFAULT_MAX_SEQUENCE_LENGTH = 77  # diffusers' SD3 training scripts default to 77, the pipeline to 256


class PipelineFamily:
    """Common interface; subclasses fill in the model-specific parts."""

    name: str = ""
    denoiser_name: str = "unet"
    takes_prompt: bool = True

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        device = getattr(self.pipeline, "_execution_device", None)
        return torch.device(device) if device is not None else next(self.denoiser.parameters()).device

    def native_resolution(self) -> int:
        raise NotImplementedError

    @property
    def image_channels(self) -> int:
        return 3

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_prompt(self, prompt: str, max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        return {}

    def predict(self, noisy: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, torch.Tensor]):
        raise NotImplementedError


def _sample_size(config) -> int:
    size = config.sample_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


class DDPMFamily(PipelineFamily):
    """Unconditional pixel-space models (``DDPMPipeline``, ``DDIMPipeline``)."""

    name = "ddpm"
    takes_prompt = False

    def native_resolution(self) -> int:
        return _sample_size(self.denoiser.config)

    @property
    def image_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def encode_image(self, pixels):
        return pixels.to(self.device, torch.float32)

    def predict(self, noisy, timestep, conditioning):
        return self.denoiser(noisy, timestep).sample


class _LatentFamily(PipelineFamily):
    def native_resolution(self) -> int:
        return _sample_size(self.denoiser.config) * int(self.pipeline.vae_scale_factor)

    @torch.no_grad()
    def encode_image(self, pixels):
        vae = self.pipeline.vae
        # The mean of the latent distribution: the training scripts' `.sample()` would change a row's
        # influence from run to run.
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor


class StableDiffusionFamily(_LatentFamily):
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): UNet, CLIP text encoder, VAE."""

    name = "stable-diffusion"

    @torch.no_grad()
    def encode_prompt(self, prompt, max_sequence_length=None):
        embeds, _ = self.pipeline.encode_prompt(prompt, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def predict(self, noisy, timestep, conditioning):
        hidden = conditioning["encoder_hidden_states"].to(self.denoiser.dtype)
        return self.denoiser(noisy, timestep, encoder_hidden_states=hidden).sample


class StableDiffusion3Family(_LatentFamily):
    """Stable Diffusion 3 (``StableDiffusion3Pipeline``): MMDiT transformer, two CLIP encoders and T5."""

    name = "sd3"
    denoiser_name = "transformer"

    @torch.no_grad()
    def encode_prompt(self, prompt, max_sequence_length=None):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length or SD3_DEFAULT_MAX_SEQUENCE_LENGTH,
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


FAMILIES = {family.name: family for family in (DDPMFamily, StableDiffusionFamily, StableDiffusion3Family)}


def detect_family(pipeline: Any) -> PipelineFamily:
    """The family of a pipeline, from its components; raises `TypeError` for unsupported pipelines."""
    components = getattr(pipeline, "components", None)
    if components is None:
        raise TypeError(f"expected a diffusers pipeline, got {type(pipeline).__name__}")
    has = lambda name: components.get(name) is not None  # noqa: E731
    if has("transformer") and has("vae") and has("text_encoder_2"):
        return StableDiffusion3Family(pipeline)
    if has("unet") and has("vae") and has("text_encoder") and not has("text_encoder_2"):
        return StableDiffusionFamily(pipeline)
    if has("unet") and not has("vae") and not has("text_encoder"):
        return DDPMFamily(pipeline)
    raise TypeError(
        f"{type(pipeline).__name__} is not supported: DMin attribution supports DDPM-style unconditional "
        "pipelines, Stable Diffusion 1.x/2.x and Stable Diffusion 3"
    )

"""The ready-made ``DMin...Pipeline`` classes: each shipped family's diffusers pipeline with
:class:`~dmin_diffusers.mixin.InfluenceMixin`, registered as its family's
:attr:`~dmin_diffusers.families.PipelineFamily.ready_made` class (exported by :mod:`dmin_diffusers`).

They live above the families and the mixin, so that a family module never imports the mixin.
"""

from __future__ import annotations

from diffusers import (
    DDPMPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from .families import register_ready_made
from .mixin import InfluenceMixin


@register_ready_made("ddpm")
class DMinDDPMPipeline(InfluenceMixin, DDPMPipeline):
    """`DDPMPipeline` with DMin attribution: ``pipe.attribute(image, top_k=10)``."""


@register_ready_made("stable-diffusion")
class DMinStableDiffusionPipeline(InfluenceMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` with DMin attribution: ``pipe.attribute(image, prompt, top_k=10)``."""


@register_ready_made("sdxl")
class DMinStableDiffusionXLPipeline(InfluenceMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` with DMin attribution: ``pipe.attribute(image, prompt, top_k=10)``."""


@register_ready_made("sd3")
class DMinStableDiffusion3Pipeline(InfluenceMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` with DMin attribution: ``pipe.attribute(image, prompt, top_k=10)``."""


@register_ready_made("flux")
class DMinFluxPipeline(InfluenceMixin, FluxPipeline):
    """`FluxPipeline` with DMin attribution: ``pipe.attribute(image, prompt, top_k=10)``."""


__all__ = [
    "DMinDDPMPipeline",
    "DMinFluxPipeline",
    "DMinStableDiffusion3Pipeline",
    "DMinStableDiffusionPipeline",
    "DMinStableDiffusionXLPipeline",
]

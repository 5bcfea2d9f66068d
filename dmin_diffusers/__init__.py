"""dmin-diffusers: which training images made a diffusion model generate this image? (DMin for diffusers)"""

from .config import DMinConfig
from .index import AttributionIndex
from .mixin import (
    DMinDDPMPipeline,
    DMinStableDiffusion3Pipeline,
    DMinStableDiffusionPipeline,
    InfluenceMixin,
    enable_attribution,
)
from .result import AttributionResult
from .sketch import SketchProjector, fold_sketch

__version__ = "0.1.0"

__all__ = [
    "AttributionIndex",
    "AttributionResult",
    "DMinConfig",
    "DMinDDPMPipeline",
    "DMinStableDiffusion3Pipeline",
    "DMinStableDiffusionPipeline",
    "InfluenceMixin",
    "SketchProjector",
    "enable_attribution",
    "fold_sketch",
]

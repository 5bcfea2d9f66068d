"""Pipeline families: one module per family of diffusers pipelines, each registering a
:class:`PipelineFamily` that says how to run the family's denoiser exactly as its training scripts do."""

from .base import LatentFamily, PipelineFamily, PreparedExample, sample_size
from .registry import detect_family, family_named, register_family, register_ready_made, registered_families

__all__ = [
    "LatentFamily",
    "PipelineFamily",
    "PreparedExample",
    "detect_family",
    "family_named",
    "register_family",
    "register_ready_made",
    "registered_families",
    "sample_size",
]

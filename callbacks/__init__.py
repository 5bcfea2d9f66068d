"""Training-loop integrations: cache DMin gradients right after fine-tuning.

Installed as ``dmin_diffusers.callbacks``; the notes for diffusers' example scripts are in this folder's
README.md.
"""

from .gradient_cache import GradientCacheCallback

__all__ = ["GradientCacheCallback"]

"""dmin-diffusers: which training images made a diffusion model generate this image? (DMin for diffusers)"""

from ._version import __version__
from .config import DMinConfig
from .families import PipelineFamily, register_family, registered_families
from .index import AttributionIndex
from .locks import IndexBusyError
from .mixin import InfluenceMixin, enable_attribution
from .model_state import ModelMismatchError
from .output_functions import register_output_function
from .preconditionings import register_preconditioning
from .pipelines import (
    DMinDDPMPipeline,
    DMinFluxPipeline,
    DMinStableDiffusion3Pipeline,
    DMinStableDiffusionPipeline,
    DMinStableDiffusionXLPipeline,
)
from .result import AttributionResult
from .sketch import SketchProjector, fold_sketch
from .store import DiskFullError, IndexChangedError, IndexIntegrityError

# Every error the library raises on purpose is exported above (tests/test_cli.py checks it).
__all__ = [
    "AttributionIndex",
    "AttributionResult",
    "DMinConfig",
    "DMinDDPMPipeline",
    "DMinFluxPipeline",
    "DMinStableDiffusion3Pipeline",
    "DMinStableDiffusionPipeline",
    "DMinStableDiffusionXLPipeline",
    "DiskFullError",
    "IndexBusyError",
    "IndexChangedError",
    "IndexIntegrityError",
    "InfluenceMixin",
    "ModelMismatchError",
    "PipelineFamily",
    "SketchProjector",
    "__version__",
    "enable_attribution",
    "fold_sketch",
    "register_family",
    "register_output_function",
    "register_preconditioning",
    "registered_families",
]

"""dmin-diffusers: which training images made a diffusion model generate this image? (DMin for diffusers)"""

from ._version import __version__
from .config import DMinConfig
from .families import PipelineFamily, register_family, registered_families
from .index import AttributionIndex
from .locks import IndexBusyError
from .mixin import InfluenceMixin, enable_attribution
from .model_state import ModelMismatchError
from .result import AttributionResult
from .sketch import SketchProjector, fold_sketch
from .store import DiskFullError, IndexChangedError, IndexIntegrityError

# Every error the library raises on purpose is exported above (tests/test_cli.py checks it).
# The ready-made DMin...Pipeline classes live in their families' modules (dmin_diffusers/families/).
_READY_MADE = {family.ready_made.__name__: family.ready_made for family in registered_families() if family.ready_made}
globals().update(_READY_MADE)

__all__ = [
    "AttributionIndex",
    "AttributionResult",
    "DMinConfig",
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
    *sorted(_READY_MADE),
]

"""`DMinConfig`: everything the cached vectors depend on, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import operator
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
OBJECTIVES = ("epsilon", "v_prediction", "sample", "flow_matching")
#: what the gradient is taken of: the training loss (the paper) or one of D-TRAK's functions of the model output
OUTPUT_FUNCTIONS = ("loss", "squared_norm", "mean")
#: where the ``T`` timesteps sit when they are not given explicitly
TIMESTEP_SPACINGS = ("centres", "linspace", "cubic")
#: one noise tensor for every timestep (the paper), or one of its own per timestep
NOISE_MODES = ("shared", "per_timestep")
#: how images are resized: the names of the training scripts' ``--image_interpolation_mode`` (torchvision's modes)
INTERPOLATION_MODES = ("bilinear", "bicubic", "box", "nearest", "nearest_exact", "hamming", "lanczos")
#: how stored rows and queries are compared (``dmin_diffusers.preconditioner``)
PRECONDITIONINGS = ("none", "centered", "kernel", "centered-kernel")
CONFIG_NAME = "dmin_config.json"
FORMAT_VERSION = 5  # 2: the recipe fields; 3: knn_projection, and knn_dim's default (before: K, folded);
# 4: image_interpolation_mode (before: always bilinear) and adapter_fingerprint; 5: preconditioning (before: none)
#: how rows become HNSW vectors: "pca", per-timestep principal components (knn_projection.py); "fold", the nested
#: sketch of size knn_dim
KNN_PROJECTIONS = ("pca", "fold")
#: HNSW values per timestep unless knn_dim says otherwise (chosen in benchmarks/knn_recall.py)
DEFAULT_KNN_DIM = 64
#: the paper's recipe; also what an index written before these fields existed (format 1) was built with
PAPER_RECIPE = {"output_function": "loss", "timestep_spacing": "centres", "noise": "shared", "noise_draws": 1,
                "preconditioning": "none"}


#: seeds are 64-bit signed integers (torch's and numpy's generators take them)
MAX_SEED = 2**63 - 1
#: bounds of the HNSW graph parameters: hnswlib crashes with ``M`` < 2 and allocates ``2 * M`` links per row,
#: and an ``ef_construction`` beyond 100,000 only slows the build down
HNSW_M_RANGE = (2, 1024)
HNSW_EF_CONSTRUCTION_RANGE = (1, 100_000)
# Upper bounds, checked before anything is allocated from a config (an index's config may come from anywhere): each
# is far beyond any real setting (the paper: T = 10, K = 2**12 to 2**16; SD's 1,000 training steps; 8k-pixel images).
MAX_TIMESTEPS = 100_000
MAX_ROW_DIM = 1 << 26  # values in one stored row (T x K): 128 MB in float16
MAX_NOISE_DRAWS = 1024
MAX_RESOLUTION = 16_384
MAX_SEQUENCE_LENGTH = 1 << 16
MAX_SHARD_SIZE = 1 << 20


def check_method(method: str, damping: float) -> None:
    """``ValueError`` unless ``method`` is one of ``PRECONDITIONINGS`` and ``damping`` a finite number in (0, 1e3]."""
    if method not in PRECONDITIONINGS:
        raise ValueError(f"preconditioning must be one of {PRECONDITIONINGS}, got {method!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping <= 1e3:
        raise ValueError(f"preconditioning_damping must be a number in (0, 1000], got {damping!r}")


def default_knn_dim(projection_dim: int) -> int:
    """The default per-timestep HNSW size for ``K = projection_dim``: ``DEFAULT_KNN_DIM``, or ``K`` if smaller."""
    return min(DEFAULT_KNN_DIM, projection_dim)


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and not value & (value - 1)


def check_integer(
    name: str, value: Any, low: int | None = None, high: int | None = None, type_error: type[Exception] = TypeError
) -> int:
    """``value`` as a plain ``int`` when it is an integer (Python, numpy or anything with ``__index__``, but not a
    bool) in ``[low, high]``; otherwise ``type_error`` (wrong type) or ``ValueError`` (out of range) naming ``name``."""
    if isinstance(value, (bool, np.bool_)):
        raise type_error(f"{name} must be an integer, got the bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise type_error(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"at least {low}" if high is None else f"at most {high}" if low is None else f"in [{low}, {high}]"
        shown = str(number) if abs(number) < 10**30 else f"a {len(str(abs(number)))}-digit integer"
        raise ValueError(f"{name} must be an integer {bounds}, got {shown}")
    return number


def require_config(config: Any) -> "DMinConfig":
    """``config`` itself, or the default :class:`DMinConfig` for ``None``; anything else (a dict, a path, ...) is
    refused with a ``TypeError``. Shared by every entry point that takes a config."""
    if config is None:
        return DMinConfig()
    if not isinstance(config, DMinConfig):
        raise TypeError(
            "config must be a DMinConfig (use DMinConfig(**values) or DMinConfig.from_dict), "
            f"got {type(config).__name__}"
        )
    return config


@dataclass
class DMinConfig:
    """Settings of a DMin attribution index.

    The user-facing fields default to the recipe measured best by ``benchmarks/quality.py`` (see
    :meth:`paper` for the paper's exact recipe). The fields after them are filled in from the pipeline
    by :func:`dmin_diffusers.gradients.resolve_config` when an index is built, so that a saved config records every
    choice the vectors depend on and a query can be computed in exactly the same way later.

    Args:
        num_timesteps: ``T``, how many training timesteps each gradient is taken at.
        projection_dim: ``K``, the compressed size per timestep (a power of two).
        seed: seeds the fixed noise tensor and the compressor's permutation and signs (``0 <= seed <= 2**63 - 1``).
        timesteps: explicit training-schedule timesteps in ``[0, num_train_timesteps)``; by default ``T``
            values placed by ``timestep_spacing`` (the noise level grows with the timestep).
        output_function: the function of the denoiser's output whose gradient is taken, for training rows and
            queries alike: ``"loss"``, the training loss against the fixed noise's target (the paper);
            ``"squared_norm"``, the squared L2 norm of the output (D-TRAK's best, Zheng et al. 2024); ``"mean"``,
            the mean of the output. The last two do not use the target, so they are the same for every objective.
        timestep_spacing: ``"centres"`` of ``T`` equal slices of the schedule (the paper), ``"linspace"``
            (evenly spaced from 0 to the last training step, both included) or ``"cubic"`` (the official DMin
            code's ``(N - 1)(1 - (i / T)^3)`` for ``i = 1..T``, packed at high noise).
        noise: ``"shared"``: one fixed noise tensor for every timestep (the paper); ``"per_timestep"``: a fixed
            tensor of its own for each timestep (same cost).
        noise_draws: fixed noise draws per timestep; with more than one, the output function is averaged over
            the draws (one batched forward and backward, so the cost grows less than linearly).
        tracked_parameters: ``fnmatch`` patterns of denoiser parameter names to take gradients of; by default
            the LoRA parameters when the denoiser has adapters, else all its trainable parameters.
        resolution: training image size; by default the denoiser's native size.
        center_crop: crop the center after resizing (otherwise the top-left corner), as the training scripts.
        image_interpolation_mode: the filter that resizes images, named as the text-to-image training scripts'
            ``--image_interpolation_mode`` (their default, and that of the SD / SDXL DreamBooth LoRA scripts, is
            ``"lanczos"``; ``train_dreambooth.py`` and the SD3 / Flux DreamBooth scripts resize bilinearly).
        max_sequence_length: T5 prompt length (SD3 and Flux; by default that of the family's training scripts:
            77 for SD3, 512 for Flux).
        guidance_scale: the guidance value given to a transformer with a guidance embedding (Flux.1 dev), as the
            training script's ``--guidance_scale`` (default 3.5); ignored by other models.
        storage_dtype: dtype of the stored vectors.
        knn_dim: per-timestep size of the vectors in the HNSW index, a power of two up to ``K``; by default 64
            (:func:`default_knn_dim`). The HNSW index proposes candidates that are re-ranked exactly on the stored
            ``K``-dimensional rows.
        knn_projection: how a row's ``K`` values per timestep become ``knn_dim``: ``"pca"``, their projection
            on the leading principal components of the stored rows (fitted when the HNSW index is built, saved
            beside it); ``"fold"``, the nested sketch (sums of ``K / knn_dim`` adjacent buckets).
        preconditioning: how stored rows and queries are compared (:mod:`~dmin_diffusers.preconditioner`):
            ``"none"`` (DMin's inner product), ``"centered"`` (cosine after removing the rows' mean),
            ``"kernel"`` (TRAK's ``(ΦᵀΦ/N + λI)⁻¹``) or ``"centered-kernel"``, fitted per timestep from the
            stored rows after caching; :meth:`AttributionIndex.refit` switches an index without new gradients.
            By default (``None``) the family's :attr:`~dmin_diffusers.families.PipelineFamily.default_preconditioning`,
            recorded when the index is built: ``"centered"`` for latent models (SD, SDXL, SD3, Flux), where it beat
            ``"none"`` on the detection benchmark's selection queries in all three latent settings beyond the seeds'
            spread with the same LDS, and ``"none"`` for pixel-space DDPM, where every other option ranked worse
            (``benchmarks/results/quality.md``, ``lds.md``, ``quickstart-scores.md``).
        preconditioning_damping: the kernel's ``λ`` as a fraction of each timestep's largest eigenvalue (0.01 was
            best on the LDS benchmark's selection queries).
        hnsw_m, hnsw_ef_construction: HNSW graph parameters, ``2 <= hnsw_m <= 1024`` and
            ``1 <= hnsw_ef_construction <= 100000`` (``HNSW_M_RANGE``, ``HNSW_EF_CONSTRUCTION_RANGE``).
        shard_size: rows per file on disk.
        base_model: Hub id of the base pipeline, shown on the dataset card (by default the pipeline's
            ``name_or_path`` when that is a Hub id, not a local directory).
        adapter: Hub id or name of the fine-tuned adapter (e.g. the LoRA repository), shown on the dataset card.

    The fields resolved from the pipeline record, besides the settings above, what ties the vectors to one
    pipeline: the tracked parameters' names and shapes (``parameters``), a digest of each one's values
    (``parameter_digests``) and of all of them together (``parameter_fingerprint``), a cheap fingerprint of the
    rest of the denoiser (``denoiser_fingerprint``: its architecture and a sample of its base weights), of the models
    that encode images and prompts (``input_models_fingerprint``: the VAE, text encoders and tokenizers), of the
    training objective (``objective_fingerprint``: the noisy input and target it produces at each timestep) and of
    the peft adapters' state (``adapter_fingerprint``: scales, active, disabled and merged adapters).
    ``base_model``, ``adapter`` and ``denoiser_dtype`` only describe the index and are never compared.
    """

    num_timesteps: int = 10
    projection_dim: int = 4096
    seed: int = 0
    timesteps: list[int] | None = None
    output_function: str = "squared_norm"  # measured best in benchmarks/quality.py; the paper's is "loss"
    timestep_spacing: str = "centres"
    noise: str = "shared"
    noise_draws: int = 1
    tracked_parameters: list[str] | None = None
    resolution: int | None = None
    center_crop: bool = True
    image_interpolation_mode: str = "bilinear"
    max_sequence_length: int | None = None
    guidance_scale: float | None = None
    storage_dtype: str = "float16"
    knn_dim: int | None = None
    knn_projection: str = "pca"
    preconditioning: str | None = None  # None: the family's default_preconditioning
    preconditioning_damping: float = 0.01
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    shard_size: int = 1024
    base_model: str | None = None
    adapter: str | None = None
    # resolved from the pipeline
    family: str | None = None
    objective: str | None = None
    num_train_timesteps: int | None = None
    parameters: list[list[Any]] | None = field(default=None, repr=False)
    parameter_fingerprint: str | None = None
    parameter_digests: list[str] | None = field(default=None, repr=False)
    denoiser_fingerprint: str | None = None
    input_models_fingerprint: str | None = None
    objective_fingerprint: str | None = None
    adapter_fingerprint: str | None = None
    denoiser_dtype: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        """Checks every field (``ValueError`` naming it, for a wrong type too) and stores integers as plain ``int``."""
        integers = {  # field: (low, high, may be None)
            "num_timesteps": (1, MAX_TIMESTEPS, False), "projection_dim": (1, MAX_ROW_DIM, False),
            "seed": (0, MAX_SEED, False), "noise_draws": (1, MAX_NOISE_DRAWS, False),
            "resolution": (1, MAX_RESOLUTION, True), "max_sequence_length": (1, MAX_SEQUENCE_LENGTH, True),
            "knn_dim": (1, None, True), "hnsw_m": (*HNSW_M_RANGE, False),
            "hnsw_ef_construction": (*HNSW_EF_CONSTRUCTION_RANGE, False), "shard_size": (1, MAX_SHARD_SIZE, False),
            "num_train_timesteps": (1, MAX_TIMESTEPS, True), "format_version": (1, FORMAT_VERSION, False),
        }
        for name, (low, high, optional) in integers.items():
            value = getattr(self, name)
            if not (optional and value is None):
                setattr(self, name, check_integer(name, value, low, high, type_error=ValueError))
        if self.guidance_scale is not None:
            if isinstance(self.guidance_scale, (bool, np.bool_)) or not isinstance(self.guidance_scale, (int, float)):
                raise ValueError(f"guidance_scale must be a number or None, got {self.guidance_scale!r}")
            if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
                raise ValueError(f"guidance_scale must be finite and >= 0, got {self.guidance_scale!r}")
            self.guidance_scale = float(self.guidance_scale)
        if isinstance(self.preconditioning_damping, int) and not isinstance(self.preconditioning_damping, bool):
            self.preconditioning_damping = float(self.preconditioning_damping)
        check_method(self.preconditioning or "none", self.preconditioning_damping)
        if not isinstance(self.center_crop, (bool, np.bool_)):
            raise ValueError(f"center_crop must be True or False, got {self.center_crop!r}")
        self.center_crop = bool(self.center_crop)
        for name in ("base_model", "adapter"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or None, got {getattr(self, name)!r}")
        if not _is_power_of_two(self.projection_dim):
            raise ValueError(f"projection_dim must be a power of two, got {self.projection_dim}")
        if self.row_dim > MAX_ROW_DIM:
            raise ValueError(
                f"num_timesteps x projection_dim must be at most {MAX_ROW_DIM:,} values a row, got "
                f"{self.num_timesteps} x {self.projection_dim}"
            )
        if self.timesteps is not None:
            if isinstance(self.timesteps, (str, bytes)) or not hasattr(self.timesteps, "__iter__"):
                raise ValueError(f"timesteps must be a list of integers, got {self.timesteps!r}")
            # integral floats (5.0) are refused too: a float timestep is a mistake, never rounded silently
            self.timesteps = [
                check_integer(f"timesteps[{i}]", t, 0, type_error=ValueError) for i, t in enumerate(self.timesteps)
            ]
            if len(self.timesteps) != self.num_timesteps:
                raise ValueError(
                    f"timesteps has {len(self.timesteps)} values but num_timesteps is {self.num_timesteps}"
                )
        for name, allowed in (("output_function", OUTPUT_FUNCTIONS), ("timestep_spacing", TIMESTEP_SPACINGS),
                              ("noise", NOISE_MODES), ("knn_projection", KNN_PROJECTIONS),
                              ("image_interpolation_mode", INTERPOLATION_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        if self.knn_dim is not None and (
            not _is_power_of_two(self.knn_dim) or self.knn_dim > self.projection_dim
        ):
            raise ValueError(
                f"knn_dim must be a power of two no larger than projection_dim ({self.projection_dim}), "
                f"got {self.knn_dim}"
            )
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if isinstance(self.tracked_parameters, str):
            self.tracked_parameters = [self.tracked_parameters]
        if self.tracked_parameters is not None and (
            not isinstance(self.tracked_parameters, (list, tuple))
            or not all(isinstance(pattern, str) for pattern in self.tracked_parameters)
        ):
            raise ValueError(
                f"tracked_parameters must be a list of fnmatch patterns (strings), got {self.tracked_parameters!r}"
            )
        if self.tracked_parameters is not None:
            self.tracked_parameters = list(self.tracked_parameters)

    @classmethod
    def paper(cls, **overrides: Any) -> "DMinConfig":
        """The DMin paper's exact recipe: gradients of the training loss, ``T`` timesteps at the centres of
        equal slices of the schedule, and one noise tensor shared by every timestep and row. ``overrides`` set
        any other field (e.g. ``projection_dim``)."""
        return cls(**{**PAPER_RECIPE, **overrides})

    @property
    def row_dim(self) -> int:
        """Length of one stored row: ``T * K``."""
        return self.num_timesteps * self.projection_dim

    @property
    def is_resolved(self) -> bool:
        return None not in (self.family, self.objective, self.timesteps, self.resolution, self.parameters)

    def replace(self, **changes: Any) -> "DMinConfig":
        return dataclasses.replace(self, **changes)

    def unresolved(self) -> "DMinConfig":
        """A copy without the fields that :func:`resolve_config` derives from a pipeline."""
        return self.replace(
            family=None, objective=None, num_train_timesteps=None, parameters=None, parameter_fingerprint=None,
            parameter_digests=None, denoiser_fingerprint=None, input_models_fingerprint=None,
            objective_fingerprint=None, adapter_fingerprint=None, denoiser_dtype=None,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DMinConfig":
        if not isinstance(values, dict):
            raise ValueError(f"a DMin config is a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DMinConfig fields {unknown}; was this index written by a newer version?")
        version = values.get("format_version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise ValueError(
                f"this index was written by a newer dmin-diffusers (config format {version}, this version reads up to "
                f"{FORMAT_VERSION}): upgrade with pip install -U dmin-diffusers"
            )
        if version < 2:  # written before the recipe fields: built with the paper's recipe
            values = {**PAPER_RECIPE, **values}
        if version < 3:  # then, the HNSW vectors were folded, and no knn_dim meant the full K
            knn_dim = values.get("knn_dim") or values.get("projection_dim", cls.projection_dim)
            values = {**values, "knn_projection": "fold", "knn_dim": knn_dim}
        if version < 5:  # then, rows were compared by their plain inner product
            values = {**values, "preconditioning": "none"}
        return cls(**values)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
            handle.write("\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "DMinConfig":
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def differences(self, other: "DMinConfig") -> list[str]:
        """Human-readable list of what differs between this config (an index's) and ``other`` (one resolved
        against a pipeline): settings field by field, tracked parameters by name, shape and value, and the
        denoiser and objective fingerprints in words. Descriptive fields (``DESCRIPTIVE_FIELDS``) are ignored,
        and so is a fingerprint that one side does not have (an index from before it was recorded)."""
        mine, theirs = self.to_dict(), other.to_dict()
        same_parameters = mine["parameters"] == theirs["parameters"]
        # the denoiser fingerprint leaves the tracked parameters out: comparable only when they are the same ones
        same_names = [p[0] for p in mine["parameters"] or []] == [p[0] for p in theirs["parameters"] or []]
        found = []
        for name, value in mine.items():
            other_value = theirs[name]
            if name in DESCRIPTIVE_FIELDS or name in SCORING_FIELDS or value == other_value:
                continue
            if name in _FINGERPRINTS and (value is None or other_value is None):
                continue
            if name == "parameters":
                found.append(describe_parameter_difference(value or [], other_value or []))
            elif name == "parameter_digests":
                if same_parameters:
                    found.append(describe_value_difference(self, other))
            elif name == "parameter_fingerprint":  # explained by the fields it digests, when they are known
                digests = mine["parameter_digests"]
                if same_parameters and digests is not None and digests == theirs["parameter_digests"]:
                    found.append(f"{name}: {value!r} != {other_value!r}")
            elif name == "denoiser_fingerprint":
                if same_names:
                    found.append(
                        "denoiser: its architecture or base weights (outside the tracked parameters) differ from "
                        "those the index was built with"
                    )
            elif name == "input_models_fingerprint":
                found.append(
                    "input models: the VAE, text encoder(s) or tokenizer(s) that turn an image and a prompt into the "
                    "denoiser's inputs differ from those the index was built with"
                )
            elif name == "adapter_fingerprint":
                found.append(
                    "adapters: the LoRA scales, or which adapters are active, disabled or fused into the weights, "
                    "differ from when the index was built (set_adapters, disable_lora, fuse_lora, load_lora_weights)"
                )
            elif name == "objective_fingerprint":
                found.append(
                    "objective: the training noise schedule or prediction target (from the scheduler config) "
                    "differs from the index's"
                )
            else:
                found.append(f"{name}: {value!r} != {other_value!r}")
        return found


DESCRIPTIVE_FIELDS = ("base_model", "adapter", "denoiser_dtype")
#: how rows are compared, not what they hold: refitted from the stored rows (``AttributionIndex.refit``), never stale
SCORING_FIELDS = ("preconditioning", "preconditioning_damping")
_FINGERPRINTS = (
    "parameter_fingerprint", "parameter_digests", "denoiser_fingerprint", "input_models_fingerprint",
    "objective_fingerprint", "adapter_fingerprint",
)


def describe_value_difference(expected: DMinConfig, actual: DMinConfig) -> str:
    """Says which tracked parameters hold other values than when the index was built (same names and shapes)."""
    names = [name for name, _ in expected.parameters or []]
    changed = [
        name for name, a, b in zip(names, expected.parameter_digests or [], actual.parameter_digests or []) if a != b
    ]
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    message = (
        f"tracked parameter values: {len(changed)} of {len(names)} differ from those the index was built with "
        f"(a different adapter or checkpoint): {shown}"
    )
    if expected.denoiser_dtype and actual.denoiser_dtype and expected.denoiser_dtype != actual.denoiser_dtype:
        message += (
            f" (the index was built with {expected.denoiser_dtype} weights, this denoiser is "
            f"{actual.denoiser_dtype}; values are compared after a cast to float16, so float32 and float16 copies "
            "of the same weights match but bfloat16 ones do not)"
        )
    return message


def describe_parameter_difference(expected: list[list[Any]], actual: list[list[Any]]) -> str:
    """Says which tracked parameters are missing, extra or reshaped between two ``[name, shape]`` lists."""
    expected_shapes = {name: list(shape) for name, shape in expected}
    actual_shapes = {name: list(shape) for name, shape in actual}
    missing = [name for name in expected_shapes if name not in actual_shapes]
    extra = [name for name in actual_shapes if name not in expected_shapes]
    reshaped = [
        f"{name} {expected_shapes[name]} -> {actual_shapes[name]}"
        for name in expected_shapes
        if name in actual_shapes and expected_shapes[name] != actual_shapes[name]
    ]
    parts = [f"tracked parameters: {len(expected)} in the index, {len(actual)} here"]
    for label, names in (("missing here", missing), ("not in the index", extra), ("different shape", reshaped)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{label}: {shown}")
    if len(parts) == 1:
        parts.append("same names and shapes, in a different order")
    return "; ".join(parts)

"""`DMinConfig`: everything the cached vectors depend on, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .preconditionings import preconditioning_named, registered_preconditionings

# what the gradient is taken of: the registered output functions (a live view), the paper's training loss and
# D-TRAK's functions of the model output built in
from .output_functions import OUTPUT_FUNCTIONS

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
OBJECTIVES = ("epsilon", "v_prediction", "sample", "flow_matching")
#: where the ``T`` timesteps sit when they are not given explicitly
TIMESTEP_SPACINGS = ("centres", "linspace", "cubic")
#: one noise tensor for every timestep (the paper), or one of its own per timestep
NOISE_MODES = ("shared", "per_timestep")
#: how images are resized: the names of the training scripts' ``--image_interpolation_mode`` (torchvision's modes)
INTERPOLATION_MODES = ("bilinear", "bicubic", "box", "nearest", "nearest_exact", "hamming", "lanczos")
#: the built-in ways stored rows and queries are compared (``dmin_diffusers.preconditionings``)
PRECONDITIONINGS = registered_preconditionings()
CONFIG_NAME = "dmin_config.json"
FORMAT_VERSION = 5  # 2: the recipe fields; 3: knn_projection, and knn_dim's default (before: K, folded);
# 4: image_interpolation_mode (before: always bilinear) and adapter_fingerprint; 5: preconditioning (before: none)
#: how rows become HNSW vectors: "pca", per-timestep principal components (knn_projection.py); "fold", the nested
#: sketch of size knn_dim
KNN_PROJECTIONS = ("pca", "fold")
#: HNSW values per timestep unless knn_dim says otherwise (chosen in benchmarks/knn_recall.py)
DEFAULT_KNN_DIM = 64


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
    """``ValueError`` unless ``method`` and ``damping`` are valid ``preconditioning`` (not ``None``) and
    ``preconditioning_damping`` values, checked by their declarations."""
    preconditioning_named(method)
    settings()["preconditioning_damping"].check("preconditioning_damping", damping)


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


_MISSING = object()


@dataclass(frozen=True)
class Setting:
    """The one declaration of a user-settable :class:`DMinConfig` field, from which its validation, its ``dmin
    cache`` flag, the training callback's ``args.dmin_<field>``, the class docstring and the dataset card's settings
    list (every setting) are derived.

    Attributes:
        help: what the setting does (the docstring's and the flag's text).
        kind: ``int``, ``float``, ``bool``, ``str`` or ``list`` (of ``item`` values).
        choices: the allowed strings (a ``str`` setting), or a function returning them (a registry's names).
        bounds: the inclusive ``(low, high)`` of a number (``None``: unbounded on that side).
        open_low: the low bound itself is not allowed.
        optional: ``None`` is allowed (then the value comes from the pipeline or the family).
        item: the type of a list's items (``int`` or ``str``).
        flag: the ``dmin cache`` flag when it is not ``--<field>``; ``""``: no flag.
        script_argument: the training scripts' own argument that gives this value (the callback and ``dmin cache``
            read that one instead of ``dmin_<field>``).
        paper: the DMin paper's value (:meth:`DMinConfig.paper`), where the default differs from it.
        since: the config format that introduced the field; a config of an older format gets ``legacy``.
        legacy: what an index written before ``since`` was built with (by default ``paper``).
    """

    help: str
    kind: type = str
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    bounds: tuple[float | None, float | None] | None = None
    open_low: bool = False
    optional: bool = False
    item: type | None = None
    flag: str | None = None
    script_argument: str | None = None
    paper: Any = _MISSING
    since: int = 1
    legacy: Any = _MISSING

    def allowed(self) -> tuple[str, ...] | None:
        return self.choices() if callable(self.choices) else self.choices

    @property
    def legacy_value(self) -> Any:
        return self.paper if self.legacy is _MISSING else self.legacy

    def check(self, name: str, value: Any) -> Any:
        """``value`` as stored (plain ``int`` / ``float`` / ``bool`` / ``list``), or a ``ValueError`` naming ``name``."""
        if value is None and self.optional:
            return None
        if self.kind is int:
            low, high = self.bounds or (None, None)
            return check_integer(name, value, low, high, type_error=ValueError)
        if self.kind is float:
            return _check_number(name, value, self.bounds or (None, None), self.open_low, self.optional)
        if self.kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {value!r}")
            return bool(value)
        if self.kind is list:
            return _check_list(name, value, self.item)
        if self.allowed() is not None:
            if value not in self.allowed():
                raise ValueError(f"{name} must be one of {self.allowed()}, got {value!r}")
            return value
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string{' or None' if self.optional else ''}, got {value!r}")
        return value


def setting(default: Any, help: str, **declared: Any) -> Any:
    """A :class:`DMinConfig` field with its :class:`Setting` as metadata."""
    return field(default=default, metadata={"setting": Setting(help, **declared)})


def _check_number(name: str, value: Any, bounds: tuple[float | None, float | None], open_low: bool,
                  optional: bool) -> float:
    low, high = bounds
    shown = f"in ({low:g}, {high:g}]" if open_low else f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number{' or None' if optional else ''}, got {value!r}")
    if not np.isfinite(value) or (low is not None and (value <= low if open_low else value < low)) or (
            high is not None and value > high):
        raise ValueError(f"{name} must be finite and {shown}, got {value!r}")
    return float(value)


def _check_list(name: str, value: Any, item: type) -> list:
    if isinstance(value, str) and item is str:
        value = [value]  # one pattern
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of {'integers' if item is int else 'strings'}, got {value!r}")
    if item is int:  # integral floats (5.0) are refused too: a float timestep is a mistake, never rounded silently
        return [check_integer(f"{name}[{i}]", v, 0, type_error=ValueError) for i, v in enumerate(value)]
    values = list(value)
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a list of fnmatch patterns (strings), got {value!r}")
    return values


@dataclass
class DMinConfig:
    """Settings of a DMin attribution index.

    The user-facing fields default to the recipe measured best by ``benchmarks/quality.py`` (see
    :meth:`paper` for the paper's exact recipe). The fields after them are filled in from the pipeline
    by :func:`dmin_diffusers.gradients.resolve_config` when an index is built, so that a saved config records every
    choice the vectors depend on and a query can be computed in exactly the same way later. Each user-facing field
    is declared once, with its :class:`Setting` (:func:`settings`): the arguments below are generated from them.

    The fields resolved from the pipeline record, besides the settings, what ties the vectors to one
    pipeline: the tracked parameters' names and shapes (``parameters``), a digest of each one's values
    (``parameter_digests``) and of all of them together (``parameter_fingerprint``), a cheap fingerprint of the
    rest of the denoiser (``denoiser_fingerprint``: its architecture and a sample of its base weights), of the models
    that encode images and prompts (``input_models_fingerprint``: the VAE, text encoders and tokenizers), of the
    training objective (``objective_fingerprint``: the noisy input and target it produces at each timestep) and of
    the peft adapters' state (``adapter_fingerprint``: scales, active, disabled and merged adapters).
    ``base_model``, ``adapter`` and ``denoiser_dtype`` only describe the index and are never compared.
    """

    num_timesteps: int = setting(10, "``T``, how many training timesteps each gradient is taken at.", kind=int,
                                 bounds=(1, MAX_TIMESTEPS))
    projection_dim: int = setting(4096, "``K``, the compressed size per timestep (a power of two).", kind=int,
                                  bounds=(1, MAX_ROW_DIM))
    seed: int = setting(
        0, "seeds the fixed noise tensor and the compressor's permutation and signs (``0 <= seed <= 2**63 - 1``).",
        kind=int, bounds=(0, MAX_SEED), flag="--dmin_seed")  # the training scripts' --seed is the training seed
    timesteps: list[int] | None = setting(
        None, "explicit training-schedule timesteps in ``[0, num_train_timesteps)``; by default ``T`` values placed "
        "by ``timestep_spacing`` (the noise level grows with the timestep).", kind=list, item=int, optional=True)
    output_function: str = setting(
        "squared_norm", "the function of the denoiser's output whose gradient is taken, for training rows and "
        "queries alike: ``\"loss\"``, the training loss against the fixed noise's target (the paper); "
        "``\"squared_norm\"``, the squared L2 norm of the output (D-TRAK's best, Zheng et al. 2024; measured best in "
        "``benchmarks/quality.py``); ``\"mean\"``, the mean of the output. The last two do not use the target, so "
        "they are the same for every objective.", choices=OUTPUT_FUNCTIONS, paper="loss", since=2)
    timestep_spacing: str = setting(
        "centres", "``\"centres\"`` of ``T`` equal slices of the schedule (the paper), ``\"linspace\"`` (evenly "
        "spaced from 0 to the last training step, both included) or ``\"cubic\"`` (the official DMin code's "
        "``(N - 1)(1 - (i / T)^3)`` for ``i = 1..T``, packed at high noise).", choices=TIMESTEP_SPACINGS,
        paper="centres", since=2)
    noise: str = setting(
        "shared", "``\"shared\"``: one fixed noise tensor for every timestep (the paper); ``\"per_timestep\"``: a "
        "fixed tensor of its own for each timestep (same cost).", choices=NOISE_MODES, paper="shared", since=2)
    noise_draws: int = setting(
        1, "fixed noise draws per timestep; with more than one, the output function is averaged over the draws (one "
        "batched forward and backward, so the cost grows less than linearly).", kind=int,
        bounds=(1, MAX_NOISE_DRAWS), paper=1, since=2)
    tracked_parameters: list[str] | None = setting(
        None, "``fnmatch`` patterns of denoiser parameter names to take gradients of; by default the LoRA "
        "parameters when the denoiser has adapters, else all its trainable parameters.", kind=list, item=str,
        optional=True)
    resolution: int | None = setting(
        None, "training image size; by default the denoiser's native size.", kind=int, bounds=(1, MAX_RESOLUTION),
        optional=True, script_argument="resolution")
    center_crop: bool = setting(
        True, "crop the center after resizing (otherwise the top-left corner); caching from a training run always "
        "crops the center, whatever its random-crop option says.", kind=bool, flag="")
    image_interpolation_mode: str = setting(
        "bilinear", "the filter that resizes images, named as the text-to-image training scripts' "
        "``--image_interpolation_mode`` (their default, and that of the SD / SDXL DreamBooth LoRA scripts, is "
        "``\"lanczos\"``; ``train_dreambooth.py`` and the SD3 / Flux DreamBooth scripts resize bilinearly).",
        choices=INTERPOLATION_MODES, script_argument="image_interpolation_mode", since=4, legacy="bilinear")
    max_sequence_length: int | None = setting(
        None, "T5 prompt length (SD3 and Flux; by default that of the family's training scripts: 77 for SD3, 512 for "
        "Flux).", kind=int, bounds=(1, MAX_SEQUENCE_LENGTH), optional=True, script_argument="max_sequence_length")
    guidance_scale: float | None = setting(
        None, "the guidance value given to a transformer with a guidance embedding (Flux.1 dev), as the training "
        "script's ``--guidance_scale`` (default 3.5); ignored by other models.", kind=float, bounds=(0, None),
        optional=True, script_argument="guidance_scale")
    storage_dtype: str = setting("float16", "dtype of the stored vectors.", choices=STORAGE_DTYPES)
    knn_dim: int | None = setting(
        None, "per-timestep size of the vectors in the HNSW index, a power of two up to ``K``; by default "
        f"{DEFAULT_KNN_DIM} (:func:`default_knn_dim`). The HNSW index proposes candidates that are re-ranked exactly "
        "on the stored ``K``-dimensional rows.", kind=int, bounds=(1, None), optional=True)
    knn_projection: str = setting(
        "pca", "how a row's ``K`` values per timestep become ``knn_dim``: ``\"pca\"``, their projection on the "
        "leading principal components of the stored rows (fitted when the HNSW index is built, saved beside it); "
        "``\"fold\"``, the nested sketch (sums of ``K / knn_dim`` adjacent buckets).", choices=KNN_PROJECTIONS,
        since=3, legacy="fold")
    preconditioning: str | None = setting(
        None, "how stored rows and queries are compared (:mod:`~dmin_diffusers.preconditioner`): ``\"none\"`` "
        "(DMin's inner product), ``\"centered\"`` (cosine after removing the rows' mean), ``\"kernel\"`` (TRAK's "
        "``(ΦᵀΦ/N + λI)⁻¹``) or ``\"centered-kernel\"``, fitted per timestep from the stored rows after caching; "
        ":meth:`AttributionIndex.refit` switches an index without new gradients. By default (``None``) the family's "
        ":attr:`~dmin_diffusers.families.PipelineFamily.default_preconditioning`, recorded when the index is built: "
        "``\"centered\"`` for latent models (SD, SDXL, SD3, Flux), where it beat ``\"none\"`` on the detection "
        "benchmark's selection queries in all three latent settings beyond the seeds' spread with the same LDS, and "
        "``\"none\"`` for pixel-space DDPM, where every other option ranked worse (``benchmarks/results/quality.md``, "
        "``lds.md``, ``quickstart-scores.md``).", choices=registered_preconditionings, optional=True, paper="none", since=5)
    preconditioning_damping: float = setting(
        0.01, "the kernel's ``λ`` as a fraction of each timestep's largest eigenvalue (0.01 was best on the LDS "
        "benchmark's selection queries).", kind=float, bounds=(0, 1e3), open_low=True)
    hnsw_m: int = setting(32, f"the HNSW graph's ``M``, in ``{list(HNSW_M_RANGE)}``.", kind=int, bounds=HNSW_M_RANGE)
    hnsw_ef_construction: int = setting(
        200, f"the HNSW graph's ``ef_construction``, in ``{list(HNSW_EF_CONSTRUCTION_RANGE)}``.", kind=int,
        bounds=HNSW_EF_CONSTRUCTION_RANGE)
    shard_size: int = setting(1024, "rows per file on disk.", kind=int, bounds=(1, MAX_SHARD_SIZE))
    base_model: str | None = setting(
        None, "Hub id of the base pipeline, shown on the dataset card (by default the pipeline's ``name_or_path`` "
        "when that is a Hub id, not a local directory).", optional=True, flag="",
        script_argument="pretrained_model_name_or_path")
    adapter: str | None = setting(
        None, "Hub id or name of the fine-tuned adapter (e.g. the LoRA repository), shown on the dataset card.",
        optional=True, flag="")
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
        """Checks every field (``ValueError`` naming it, for a wrong type too) and stores plain values (``int``,
        ``float``, ``bool``, ``list``): each setting as its :class:`Setting` says, then what ties them together."""
        for name, declared in settings(type(self)).items():
            setattr(self, name, declared.check(name, getattr(self, name)))
        for name, low, high in (("num_train_timesteps", 1, MAX_TIMESTEPS), ("format_version", 1, FORMAT_VERSION)):
            if getattr(self, name) is not None:
                setattr(self, name, check_integer(name, getattr(self, name), low, high, type_error=ValueError))
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not _is_power_of_two(self.projection_dim):
            raise ValueError(f"projection_dim must be a power of two, got {self.projection_dim}")
        if self.row_dim > MAX_ROW_DIM:
            raise ValueError(
                f"num_timesteps x projection_dim must be at most {MAX_ROW_DIM:,} values a row, got "
                f"{self.num_timesteps} x {self.projection_dim}"
            )
        if self.timesteps is not None and len(self.timesteps) != self.num_timesteps:
            raise ValueError(f"timesteps has {len(self.timesteps)} values but num_timesteps is {self.num_timesteps}")
        if self.knn_dim is not None and (not _is_power_of_two(self.knn_dim) or self.knn_dim > self.projection_dim):
            raise ValueError(
                f"knn_dim must be a power of two no larger than projection_dim ({self.projection_dim}), "
                f"got {self.knn_dim}"
            )

    @classmethod
    def paper(cls, **overrides: Any) -> "DMinConfig":
        """The DMin paper's exact recipe: gradients of the training loss, ``T`` timesteps at the centres of
        equal slices of the schedule, and one noise tensor shared by every timestep and row. ``overrides`` set
        any other field (e.g. ``projection_dim``)."""
        return cls(**{**paper_recipe(cls), **overrides})

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
        # a field newer than the file's format: what an index of that format was built with
        values = {**{name: declared.legacy_value for name, declared in settings(cls).items()
                     if version < declared.since}, **values}
        if version < 3:  # then, no knn_dim meant the full K
            values["knn_dim"] = values.get("knn_dim") or values.get("projection_dim", cls.projection_dim)
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


def settings(config_class: type | None = None) -> dict[str, Setting]:
    """The user-settable fields of ``config_class`` (:class:`DMinConfig` by default) and their declarations, in
    field order."""
    return {item.name: item.metadata["setting"] for item in dataclasses.fields(config_class or DMinConfig)
            if "setting" in item.metadata}


def paper_recipe(config_class: type | None = None) -> dict[str, Any]:
    """The settings whose declaration gives the paper's value, with that value."""
    return {name: declared.paper for name, declared in settings(config_class).items() if declared.paper is not _MISSING}


def arguments_doc(config_class: type) -> str:
    """The ``Args:`` section of ``config_class``'s docstring, from its settings."""
    lines = ["", "    Args:"]
    for name, declared in settings(config_class).items():
        lines.append(textwrap.fill(f"{name}: {declared.help}", width=116, initial_indent=" " * 8,
                                   subsequent_indent=" " * 12))
    return "\n".join(lines) + "\n"


DMinConfig.__doc__ += arguments_doc(DMinConfig)
#: the paper's recipe (:meth:`DMinConfig.paper`)
PAPER_RECIPE = paper_recipe()


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

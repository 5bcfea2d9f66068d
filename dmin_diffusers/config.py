"""`DMinConfig`: everything the cached vectors depend on, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
OBJECTIVES = ("epsilon", "v_prediction", "sample", "flow_matching")
CONFIG_NAME = "dmin_config.json"
FORMAT_VERSION = 1


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and not value & (value - 1)


@dataclass
class DMinConfig:
    """Settings of a DMin attribution index.

    The user-facing fields have the paper's defaults. The fields after them are filled in from the pipeline
    by :func:`dmin_diffusers.gradients.resolve_config` when an index is built, so that a saved config records every choice the vectors depend
    on and a query can be computed in exactly the same way later.

    Args:
        num_timesteps: ``T``, how many training timesteps each gradient is taken at.
        projection_dim: ``K``, the compressed size per timestep (a power of two).
        seed: seeds the fixed noise tensor and the compressor's permutation and signs.
        timesteps: explicit training-schedule timesteps in ``[0, num_train_timesteps)``; by default ``T``
            values spread evenly over the whole schedule (the noise level grows with the timestep).
        tracked_parameters: ``fnmatch`` patterns of denoiser parameter names to take gradients of; by default
            the LoRA parameters when the denoiser has adapters, else all its trainable parameters.
        resolution: training image size; by default the denoiser's native size.
        center_crop: crop the center after resizing (otherwise the top-left corner), as the training scripts.
        max_sequence_length: T5 prompt length for SD3 (default 77, as diffusers' SD3 training scripts).
        storage_dtype: dtype of the stored vectors.
        knn_dim: per-timestep size of the vectors in the HNSW index, a power of two up to ``K``; smaller values
            shrink the in-memory index and are re-ranked exactly on the stored ``K``-dimensional rows.
        hnsw_m, hnsw_ef_construction: HNSW graph parameters.
        shard_size: rows per file on disk.
        base_model: Hub id of the base pipeline, shown on the dataset card (by default the pipeline's
            ``name_or_path`` when that is a Hub id, not a local directory).
        adapter: Hub id or name of the fine-tuned adapter (e.g. the LoRA repository), shown on the dataset card.

    The fields resolved from the pipeline record, besides the settings above, what ties the vectors to one
    pipeline: the tracked parameters' names and shapes (``parameters``), a digest of each one's values
    (``parameter_digests``) and of all of them together (``parameter_fingerprint``), a cheap fingerprint of the
    rest of the denoiser (``denoiser_fingerprint``: its architecture and a sample of its base weights) and of the
    training objective (``objective_fingerprint``: the noisy input and target it produces at each timestep).
    ``base_model``, ``adapter`` and ``denoiser_dtype`` only describe the index and are never compared.
    """

    num_timesteps: int = 10
    projection_dim: int = 4096
    seed: int = 0
    timesteps: list[int] | None = None
    tracked_parameters: list[str] | None = None
    resolution: int | None = None
    center_crop: bool = True
    max_sequence_length: int | None = None
    storage_dtype: str = "float16"
    knn_dim: int | None = None
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
    objective_fingerprint: str | None = None
    denoiser_dtype: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be at least 1, got {self.num_timesteps}")
        if not _is_power_of_two(self.projection_dim):
            raise ValueError(f"projection_dim must be a power of two, got {self.projection_dim}")
        if self.timesteps is not None:
            self.timesteps = [int(t) for t in self.timesteps]
            if len(self.timesteps) != self.num_timesteps:
                raise ValueError(
                    f"timesteps has {len(self.timesteps)} values but num_timesteps is {self.num_timesteps}"
                )
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
            parameter_digests=None, denoiser_fingerprint=None, objective_fingerprint=None, denoiser_dtype=None,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DMinConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DMinConfig fields {unknown}; was this index written by a newer version?")
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
            if name in DESCRIPTIVE_FIELDS or value == other_value:
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
            elif name == "objective_fingerprint":
                found.append(
                    "objective: the training noise schedule or prediction target (from the scheduler config) "
                    "differs from the index's"
                )
            else:
                found.append(f"{name}: {value!r} != {other_value!r}")
        return found


DESCRIPTIVE_FIELDS = ("base_model", "adapter", "denoiser_dtype")
_FINGERPRINTS = ("parameter_fingerprint", "parameter_digests", "denoiser_fingerprint", "objective_fingerprint")


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

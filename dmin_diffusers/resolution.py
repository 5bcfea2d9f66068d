"""Resolving a :class:`~dmin_diffusers.config.DMinConfig` against a pipeline: the fields an index records about the
pipeline it was built on (family, objective, timesteps, resolution, tracked parameters and the fingerprints that tie
the vectors to one model), and the comparison of a recorded config with a pipeline.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import torch

from .config import DMinConfig, default_knn_dim
from .families.base import PipelineFamily
from .fingerprints import (
    NamedParameters,
    denoiser_fingerprint,
    describe_parameters,
    input_models_fingerprint,
    objective_fingerprint,
    parameter_digests,
    parameter_fingerprint,
)
from .model_state import adapter_fingerprint


def select_tracked_parameters(denoiser: torch.nn.Module, patterns: list[str] | None = None) -> NamedParameters:
    """The parameters whose gradients DMin uses.

    With ``patterns``: every parameter whose name matches one of the ``fnmatch`` patterns. Otherwise the
    LoRA (peft) parameters when the denoiser has adapters (those marked trainable, if any are), else all
    trainable parameters.
    """
    named = list(denoiser.named_parameters())
    if patterns:
        chosen = [(name, p) for name, p in named if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]
        if not chosen:
            raise ValueError(f"no parameter of the {type(denoiser).__name__} matches {patterns}")
        return chosen
    lora = [(name, p) for name, p in named if ".lora_" in name]
    if lora:
        trainable = [(name, p) for name, p in lora if p.requires_grad]
        return trainable or lora
    trainable = [(name, p) for name, p in named if p.requires_grad]
    if not trainable:
        raise ValueError(
            "the denoiser has no trainable parameters and no LoRA adapter; pass "
            "DMinConfig(tracked_parameters=[...]) with name patterns"
        )
    return trainable


def spread_timesteps(num_timesteps: int, num_train_timesteps: int, spacing: str = "centres") -> list[int]:
    """``T`` distinct training timesteps in ascending order, placed by ``spacing``:

    - ``"centres"``: the centres of ``T`` equal slices of the schedule (the paper's placement);
    - ``"linspace"``: evenly spaced from 0 to ``N - 1``, both ends included (the middle step for ``T = 1``);
    - ``"cubic"``: ``(N - 1)(1 - (i / T)^3)`` for ``i = 1..T``, as the official DMin code places them (dense at
      high noise).
    """
    if num_timesteps > num_train_timesteps:
        raise ValueError(f"num_timesteps ({num_timesteps}) exceeds the schedule's {num_train_timesteps} steps")
    last = num_train_timesteps - 1
    if spacing == "centres":
        values = [int((i + 0.5) * num_train_timesteps / num_timesteps) for i in range(num_timesteps)]
    elif spacing == "linspace":
        values = [round(i * last / (num_timesteps - 1)) for i in range(num_timesteps)] if num_timesteps > 1 else [
            last // 2
        ]
    elif spacing == "cubic":
        values = [round(last * (1 - (i / num_timesteps) ** 3)) for i in range(1, num_timesteps + 1)]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    values = sorted(values)
    if len(set(values)) != len(values):
        raise ValueError(
            f"{spacing!r} spacing puts some of {num_timesteps} timesteps on the same step of a {num_train_timesteps}-"
            "step schedule; choose fewer timesteps or another spacing"
        )
    return values


def default_base_model(pipeline: Any) -> str | None:
    """The pipeline's ``name_or_path`` when it is a Hub repository id (a local directory is not recorded)."""
    name = getattr(pipeline, "name_or_path", None)
    if not isinstance(name, str) or not name or os.path.exists(name) or name.count("/") != 1:
        return None
    return name


def resolve_config(config: DMinConfig, family: PipelineFamily) -> DMinConfig:
    """Fills in the fields that come from the pipeline: family, objective, timesteps, resolution, the tracked
    parameters with their value digests and fingerprint, and the denoiser, input-model and objective fingerprints;
    and ``knn_dim``, when unset, with its default. Fields already set are kept (and validated)."""
    objective = family.objective(config.objective)
    num_train = objective.num_train_timesteps
    timesteps = config.timesteps or spread_timesteps(config.num_timesteps, num_train, config.timestep_spacing)
    bad = [t for t in timesteps if not 0 <= t < num_train]
    if bad:
        raise ValueError(f"timesteps {bad} are outside the training schedule [0, {num_train})")
    resolution = config.resolution or family.native_resolution()
    factor = family.resolution_multiple
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of {factor} (the image size step of {family.name} "
                         "pipelines)")
    tracked = select_tracked_parameters(family.denoiser, config.tracked_parameters)
    description = describe_parameters(tracked)
    digests = parameter_digests(tracked)
    return config.replace(
        family=family.name,
        objective=objective.name,
        num_train_timesteps=num_train,
        timesteps=list(timesteps),
        resolution=resolution,
        **family.resolved_settings(config),
        knn_dim=config.knn_dim or default_knn_dim(config.projection_dim),
        parameters=description,
        parameter_fingerprint=parameter_fingerprint(description, digests),
        parameter_digests=digests,
        denoiser_fingerprint=denoiser_fingerprint(family.denoiser, tracked),
        input_models_fingerprint=input_models_fingerprint(family.pipeline, family.input_models),
        objective_fingerprint=objective_fingerprint(objective, timesteps),
        adapter_fingerprint=adapter_fingerprint(family.denoiser),
        denoiser_dtype=str(family.denoiser.dtype).removeprefix("torch."),
        base_model=config.base_model or default_base_model(family.pipeline),
    )


def check_config_matches(index_config: DMinConfig, family: PipelineFamily) -> list[str]:
    """What differs between an index's config and the same config resolved against ``family``'s pipeline."""
    try:
        here = resolve_config(index_config.unresolved(), family)
    except ValueError as error:
        return [str(error)]
    return index_config.differences(here)

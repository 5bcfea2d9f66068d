"""The model a query runs on must be the model its index was built on, at every query and not only at load.

An index's config records fingerprints of the pipeline it was built with (see
:func:`~dmin_diffusers.resolution.resolve_config`); comparing them in full hashes every tracked value, which is too
slow for every query on a large model. :func:`pipeline_state` is a cheap summary of everything a query's vector
depends on: which modules the pipeline holds, which parameters are tracked, how peft adapters act (scales, active,
disabled, merged: :func:`adapter_fingerprint`), the weights' storage and version counters and a sample of each. A
pipeline keeps the state it had when its index was attached, and a query whose state differs runs the full
comparison again (``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ``disable_lora``, an in-place edit of the
weights and a replaced component all change the state).

:func:`model_lock` serialises the use of one denoiser: per-sample gradients swap and flag its parameters, so no two
threads may differentiate it, or generate with it, at the same time.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from .fingerprints import _SAMPLES, DEFAULT_INPUT_MODELS, NamedParameters, input_model_components


class ModelMismatchError(ValueError):
    """The pipeline is not (or is no longer) the model its attribution index was built on: its tracked
    parameters, adapters, denoiser, input models or objective differ from those the index recorded."""

_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(denoiser: torch.nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises DMin's gradients and the pipeline's generation on ``denoiser`` (one per
    module, shared by every pipeline that holds it, e.g. after ``from_pipe``)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(denoiser)
        if lock is None:
            lock = _LOCKS[denoiser] = threading.RLock()
        return lock


def _adapter_layers(denoiser: torch.nn.Module) -> list[tuple[str, Any]]:
    return [(name, module) for name, module in denoiser.named_modules() if isinstance(module, BaseTunerLayer)]


def adapter_fingerprint(denoiser: torch.nn.Module) -> str | None:
    """A digest of how peft adapters act on ``denoiser``: for each adapter layer, the scales of its active adapters
    (in order), whether adapters are disabled, and how many are merged into the base weights. Adapter *names* are
    left out (a training script's ``default`` is ``default_0`` after ``load_lora_weights``). ``"none"`` without
    adapter layers (so that adding adapters to such a denoiser is a difference too)."""
    layers = _adapter_layers(denoiser)
    if not layers:
        return "none"
    described = []
    for name, layer in layers:
        scaling = getattr(layer, "scaling", {}) or {}
        scales = [f"{float(scaling.get(adapter, 1.0)):.6g}" for adapter in layer.active_adapters]
        described.append([name, scales, bool(layer.disable_adapters), len(getattr(layer, "merged_adapters", []))])
    return hashlib.sha256(json.dumps(described, separators=(",", ":")).encode()).hexdigest()[:16]


def _sample(parameter: torch.Tensor) -> torch.Tensor:
    """Up to 16 values of a parameter spread over it, as a view (nothing is copied until they are gathered)."""
    flat = parameter.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // _SAMPLES)][:_SAMPLES]


def _gathered(samples: list[torch.Tensor]) -> bytes:
    """The sampled values as float32 bytes, gathered with one copy per (device, dtype) rather than one per tensor."""
    groups: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}
    for values in samples:
        if values.device.type == "meta":  # offloaded weights without values: their identity is all there is
            continue
        groups.setdefault((str(values.device), values.dtype), []).append(values)
    return b"".join(torch.cat(group).to("cpu", torch.float32).numpy().tobytes() for group in groups.values())


def pipeline_state(pipeline: Any, denoiser: torch.nn.Module, tracked: NamedParameters,
                   input_models: Sequence[str] = DEFAULT_INPUT_MODELS) -> str:
    """A cheap digest of everything a DMin vector of ``pipeline`` depends on (see the module docstring): which
    denoiser and input models (the components ``input_models`` names: by default the VAE, text encoders and
    tokenizers) it holds, which parameters are tracked, the identity, storage and version counter of every weight
    of those models with 16 values sampled from each, and :func:`adapter_fingerprint`. Equal states mean the same
    model; a different state means that the full check must run again. Costs one pass over the parameter list and
    one device-to-host copy."""
    inputs = input_model_components(pipeline, input_models)
    models = [("denoiser", denoiser)] + [(name, part) for name, part in inputs if isinstance(part, torch.nn.Module)]
    described: list[Any] = [adapter_fingerprint(denoiser)]
    described += [[name, id(part), len(part)] for name, part in inputs
                  if not isinstance(part, torch.nn.Module) and hasattr(part, "__len__")]
    described += [[name, id(parameter), parameter._version] for name, parameter in tracked]
    samples = []  # the tracked parameters are the denoiser's: sampled with it below
    for name, model in models:
        factors = [getattr(getattr(model, "config", None), key, None) for key in ("scaling_factor", "shift_factor")]
        described.append([name, id(model), factors])
        for parameter in model.parameters():
            described.append([id(parameter), parameter._version, parameter.data_ptr()])
            samples.append(_sample(parameter))
    digest = hashlib.sha256(json.dumps(described, default=str).encode())
    digest.update(_gathered(samples))
    return digest.hexdigest()

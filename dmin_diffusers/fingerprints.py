"""Cheap fingerprints of what an index's vectors and row ids depend on, beyond the tracked parameters: the models
and tokenizers that turn an (image, prompt) into denoiser inputs, and the training dataset's rows.

Each samples instead of hashing everything, so it costs milliseconds on models of billions of parameters and on
datasets of millions of rows: two different checkpoints differ in nearly every weight, and two different (or
reordered) datasets in nearly every row, so a sample tells them apart.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable
from typing import Any

import torch

_SAMPLES = 16  # values sampled per tensor, rows sampled per dataset
_BASE_LAYER = re.compile(r"\.base_layer(?=\.)")


def float16_bytes(values: torch.Tensor) -> bytes:
    """The values as float16 on the CPU (copied to the CPU first, then cast there), as little-endian bytes."""
    return values.detach().to("cpu").to(torch.float16).contiguous().view(torch.int16).numpy().tobytes()


def evenly_spaced(count: int, total: int) -> list[int]:
    """``min(count, total)`` positions spread evenly over ``range(total)``, first and last included."""
    count = min(count, total)
    return [i * (total - 1) // max(count - 1, 1) for i in range(count)]


def add_sampled_parameters(digest, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> bool:
    """Adds each parameter's name (peft's ``.base_layer`` left out), shape and 16 evenly spaced values (as float16)
    to ``digest``. Returns ``False`` (and stops) at a parameter on the ``meta`` device, which has no values."""
    for name, parameter in named_parameters:
        if parameter.device.type == "meta":
            return False
        flat = parameter.detach().reshape(-1)
        positions = torch.tensor(evenly_spaced(_SAMPLES, flat.numel()), dtype=torch.long, device=flat.device)
        digest.update(json.dumps([_BASE_LAYER.sub("", name), list(parameter.shape)]).encode())
        digest.update(float16_bytes(flat[positions]))
    return True


def _tokenizer_state(tokenizer: Any) -> list:
    vocabulary = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    return [type(tokenizer).__name__, getattr(tokenizer, "model_max_length", None), vocabulary]


def input_models_fingerprint(pipeline: Any) -> str | None:
    """A fingerprint of the pipeline's components that encode images and prompts: the VAE (sampled weights and its
    ``scaling_factor`` / ``shift_factor``), every text encoder (sampled weights) and every tokenizer (class,
    length and vocabulary). ``None`` if a weight has no values (``meta`` device)."""
    components = getattr(pipeline, "components", {}) or {}
    digest = hashlib.sha256()
    for name in sorted(components):
        component = components[name]
        if component is None or not (name == "vae" or name.startswith(("text_encoder", "tokenizer"))):
            continue
        digest.update(name.encode())
        if isinstance(component, torch.nn.Module):
            if not add_sampled_parameters(digest, component.named_parameters()):
                return None
            if name == "vae":
                factors = [getattr(component.config, key, None) for key in ("scaling_factor", "shift_factor")]
                digest.update(json.dumps(factors).encode())
        else:
            digest.update(json.dumps(_tokenizer_state(component), ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def _value_bytes(value: Any) -> bytes:
    """Bytes that identify one cell of a dataset row: an image's mode, size and pixels, else its JSON text."""
    if hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        return json.dumps([value.mode, list(value.size)]).encode() + value.tobytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):  # undecoded Image feature
        return bytes(value["bytes"])
    buffer = io.StringIO()
    json.dump(value, buffer, default=str, sort_keys=True)
    return buffer.getvalue().encode()


def _undecoded_sample(dataset: Any, positions: list[int]) -> Any:
    """The rows at ``positions`` of a ``datasets.Dataset`` with images left as their stored bytes (nothing is
    decoded, so the digest is cheap and independent of PIL); other datasets as they are."""
    features = getattr(dataset, "features", None)
    if features is None or not hasattr(dataset, "select"):
        return None
    sample = dataset.select(positions)
    for name, feature in features.items():
        if type(feature).__name__ == "Image" and getattr(feature, "decode", False):
            sample = sample.cast_column(name, type(feature)(decode=False))
    return sample


def dataset_digest(dataset: Any, columns: list[str]) -> str:
    """A digest of 16 evenly spaced rows of ``dataset`` (their positions and the values of ``columns``) and its
    length: another dataset, or the same one reordered, gives another digest."""
    positions = evenly_spaced(_SAMPLES, len(dataset))
    sample = _undecoded_sample(dataset, positions)
    digest = hashlib.sha256(str(len(dataset)).encode())
    for number, position in enumerate(positions):
        row = sample[number] if sample is not None else dataset[position]
        digest.update(str(position).encode())
        for column in columns:
            digest.update(_value_bytes(row[column]))
    return digest.hexdigest()[:16]

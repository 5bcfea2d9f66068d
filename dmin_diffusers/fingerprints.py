"""Fingerprints of what an index's vectors and row ids depend on: the tracked parameters (names, shapes and a
digest of their values), the rest of the denoiser, the models and tokenizers that turn an (image, prompt) into
denoiser inputs, the training objective, and the training dataset's rows.

The denoiser and input-model fingerprints sample weights, so they cost milliseconds on models of billions of
parameters: two different checkpoints differ in nearly every weight. The tracked parameters are hashed in full. The
dataset digest covers every row (one edited image must be caught), by content and without decoding: it reads each
image's stored bytes or file once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.utils.file_utils import is_local_path

NamedParameters = list[tuple[str, torch.nn.Parameter]]

_SAMPLES = 16  # values sampled per tensor, rows sampled per dataset
_BASE_LAYER = re.compile(r"\.base_layer(?=\.)")
#: the pipeline components that turn an (image, prompt) into the denoiser's inputs, unless a family declares others
#: (``PipelineFamily.input_models``): ``fnmatch`` patterns of component names
DEFAULT_INPUT_MODELS = ("vae", "text_encoder*", "tokenizer*")


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


def input_model_components(
    pipeline: Any, input_models: Sequence[str] = DEFAULT_INPUT_MODELS
) -> list[tuple[str, Any]]:
    """The pipeline's components whose names match one of the ``input_models`` patterns (and are not ``None``),
    sorted by name."""
    components = getattr(pipeline, "components", {}) or {}
    return [(name, components[name]) for name in sorted(components)
            if components[name] is not None and any(fnmatch.fnmatchcase(name, pattern) for pattern in input_models)]


def input_models_fingerprint(pipeline: Any, input_models: Sequence[str] = DEFAULT_INPUT_MODELS) -> str | None:
    """A fingerprint of the pipeline's components that encode images and prompts, those named by ``input_models``
    (by default the VAE, every text encoder and every tokenizer): a model's sampled weights (for the ``vae``, with
    its ``scaling_factor`` / ``shift_factor``) and a tokenizer's class, length and vocabulary. ``None`` if a weight
    has no values (``meta`` device)."""
    digest = hashlib.sha256()
    for name, component in input_model_components(pipeline, input_models):
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


# ---------------------------------------------------------------------------------------- tracked parameters

_ADAPTER_NAME = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.[^.]+")
_DIGEST_CHUNK = 1 << 24  # elements hashed at a time, so a large parameter is never copied whole


def describe_parameters(parameters: NamedParameters) -> list[list]:
    """``[name, shape]`` for each tracked parameter, as recorded in the config.

    The peft adapter name is left out of LoRA names (``...to_q.lora_A.weight``): a training script calls its
    adapter ``default`` and ``load_lora_weights`` calls the same weights ``default_0``.
    """
    return [[_ADAPTER_NAME.sub(r".\1", name), list(p.shape)] for name, p in parameters]


def parameter_value_digest(parameter: torch.Tensor) -> str | None:
    """A digest of a parameter's values: sha256 (first 16 hex digits) of its shape and its values cast to
    float16 on the CPU.

    The cast makes the digest the same for float32 and float16 copies of the same weights (a float16 copy is
    the same round-to-nearest cast of the float32 values) and on every device. A bfloat16 copy rounds
    differently, so its digest differs. ``None`` for parameters without values (on the ``meta`` device).
    """
    if parameter.device.type == "meta":
        return None
    digest = hashlib.sha256(json.dumps(list(parameter.shape)).encode())
    flat = parameter.detach().reshape(-1)
    for start in range(0, flat.numel(), _DIGEST_CHUNK):
        digest.update(float16_bytes(flat[start : start + _DIGEST_CHUNK]))
    return digest.hexdigest()[:16]


def parameter_digests(parameters: NamedParameters) -> list[str] | None:
    """:func:`parameter_value_digest` of each tracked parameter, or ``None`` if any has no values."""
    digests = [parameter_value_digest(p) for _, p in parameters]
    return None if None in digests else digests


def parameter_fingerprint(description: list[list], digests: list[str] | None = None) -> str:
    """One digest of the tracked parameters: their names and shapes and, when given, their value digests."""
    payload = description if digests is None else [description, digests]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()[:16]


def denoiser_fingerprint(denoiser: torch.nn.Module, tracked: NamedParameters) -> str | None:
    """A cheap fingerprint of the denoiser outside the tracked parameters and the LoRA adapters: every other
    parameter's name and shape, and 16 of its values (evenly spaced, cast to float16 on the CPU as in
    :func:`parameter_value_digest`). Different base checkpoints differ in nearly every value, so a sample is
    enough to tell them apart without hashing gigabytes. peft's ``.base_layer`` is left out of names, so a
    denoiser with and without an adapter has the same base fingerprint. ``None`` if a weight is on ``meta``."""
    tracked_ids = {id(p) for _, p in tracked}
    digest = hashlib.sha256()
    others = ((name, p) for name, p in denoiser.named_parameters() if id(p) not in tracked_ids and ".lora_" not in name)
    return digest.hexdigest()[:16] if add_sampled_parameters(digest, others) else None


def objective_fingerprint(objective: Any, timesteps: list[int]) -> str:
    """A digest of what the training objective does at each recorded timestep: the noisy input, the target and
    the model timestep it produces for a clean value ``x = (1, 0)`` and noise ``(0, 1)`` (so the coefficients of
    ``x`` and of the noise), printed to 6 significant digits. Two schedulers with the same name but another noise
    schedule, shift or prediction type give different fingerprints."""
    latents = torch.tensor([[1.0, 0.0]])
    noise = torch.tensor([[0.0, 1.0]])
    values = [objective.name]
    for timestep in timesteps:
        noised = objective.noised(latents, noise, int(timestep))
        numbers = torch.cat([noised.noisy.reshape(-1), noised.target.reshape(-1), noised.model_timestep.reshape(-1)])
        values.append(" ".join(f"{float(v):.5e}" for v in numbers.float()))
    return hashlib.sha256("\n".join(values).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- dataset rows


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


#: the prefix of a digest over every row (:func:`dataset_digest`); older indices recorded 16 hex digits of a sample
ROWS_DIGEST_PREFIX = "rows-sha256:"
_SAMPLED_DIGEST = re.compile(r"^[0-9a-f]{16}$")
_BATCH_ROWS = 1024


def dataset_digest(dataset: Any, columns: list[str]) -> str:
    """A digest of every row of ``dataset``, in order: the content of each cell of ``columns`` and the row count.

    An image counts by its content, never by its path: the bytes a ``datasets`` Image feature stores, else the
    bytes of the file it points to (nothing is decoded), else its decoded pixels (a remote file, or a dataset that
    is not a ``datasets.Dataset``). So a copy of the images in another folder gives the same digest, while an image
    edited on disk, two rows swapped or the rows reordered give another. Reads every image file once.
    """
    digest = hashlib.sha256(str(len(dataset)).encode())
    for cells in _row_cells(dataset, columns):
        for cell in cells:
            digest.update(len(cell).to_bytes(8, "little"))  # length-prefixed: cell boundaries are part of it
            digest.update(cell)
    return ROWS_DIGEST_PREFIX + digest.hexdigest()


def check_dataset_digest(dataset: Any, columns: list[str], recorded: str) -> str | None:
    """Compares ``dataset`` with the digest an index recorded of its training rows: ``None`` when they match, else
    why not (a missing column, or rows that differ). A digest recorded by an older version (16 hex digits of a
    sample of 16 rows) is compared the old way."""
    missing = [column for column in columns if column not in getattr(dataset, "column_names", columns)]
    if missing:
        return f"it has no column {missing}"
    if _SAMPLED_DIGEST.match(str(recorded)):
        found = _sampled_digest(dataset, columns)
    elif str(recorded).startswith(ROWS_DIGEST_PREFIX):
        found = dataset_digest(dataset, columns)
    else:
        return f"the index records a dataset digest this version cannot read ({str(recorded)[:40]!r})"
    if found == recorded:
        return None
    return "its rows differ (an image or caption changed, or the rows are in another order)"


def _row_cells(dataset: Any, columns: list[str]) -> Iterator[list[bytes]]:
    """The bytes of each row's cells of ``columns``, row by row: read as Arrow in batches for a
    ``datasets.Dataset`` (images undecoded), else row by row as the dataset returns them."""
    features = getattr(dataset, "features", None)
    if features is None or not hasattr(dataset, "with_format"):
        for position in range(len(dataset)):
            row = dataset[position]
            yield [_value_bytes(row[column]) for column in columns]
        return
    rows = dataset.select_columns(columns).with_format(None)  # a remote image is decoded from here, untransformed
    view = rows.with_format("arrow")
    for start in range(0, len(view), _BATCH_ROWS):
        table = view[start : start + _BATCH_ROWS]
        cells = []
        for column in columns:
            values = table.column(column).combine_chunks()
            if isinstance(features[column], datasets.Image):
                cells.append(_image_cells(rows, column, values, start))
            else:
                cells.append(_plain_cells(values))
        yield from (list(row) for row in zip(*cells))


def _image_cells(rows: Any, column: str, values: Any, start: int) -> list[bytes]:
    """The content of a batch of undecoded Image cells (``values``, rows ``start...`` of ``rows``): the stored
    bytes, else the bytes of the local file, else (a remote file) the row's decoded pixels; a missing image counts
    as such."""
    stored, paths = (child.to_pylist() for child in values.flatten())  # flatten: the parent's nulls and offset
    cells = []
    for number, (content, path) in enumerate(zip(stored, paths)):
        if content is not None:
            cells.append(b"B" + content)
        elif path is None:
            cells.append(b"N")
        elif is_local_path(path):
            cells.append(b"B" + Path(path).read_bytes())
        else:
            cells.append(b"P" + _value_bytes(rows[start + number][column]))
    return cells


def _plain_cells(values: Any) -> list[bytes]:
    """A batch of non-image cells: strings as UTF-8, other values (``None`` included) as JSON."""
    return [b"S" + value.encode() if isinstance(value, str) else b"J" + _value_bytes(value)
            for value in values.to_pylist()]


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


def _sampled_digest(dataset: Any, columns: list[str]) -> str:
    """The digest that earlier versions recorded (kept to check the indices they built): 16 evenly spaced rows (their
    positions and the values of ``columns``, file paths for images on disk) and the row count."""
    positions = evenly_spaced(_SAMPLES, len(dataset))
    sample = _undecoded_sample(dataset, positions)
    digest = hashlib.sha256(str(len(dataset)).encode())
    for number, position in enumerate(positions):
        row = sample[number] if sample is not None else dataset[position]
        digest.update(str(position).encode())
        for column in columns:
            digest.update(_value_bytes(row[column]))
    return digest.hexdigest()[:16]

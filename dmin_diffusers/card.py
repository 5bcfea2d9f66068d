"""The dataset card (``README.md`` with YAML metadata) published with an attribution index on the Hub."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, constants

from .config import DMinConfig
from .families import family_named
from .hub import DEFAULT_REPO_TYPE
from .output_functions import output_function_named
from .preconditionings import preconditioning_named
from .resolution import spread_timesteps
from .search import KNN_FILES

CARD_TAGS = ["dmin", "data-attribution", "training-data-attribution", "influence-estimation", "diffusers",
             "dmin-diffusers"]
PAPER_URL = "https://arxiv.org/abs/2412.08637"
_SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]


def size_category(num_rows: int) -> str:
    """The Hub's ``size_categories`` bucket for a row count."""
    return next((label for limit, label in _SIZE_CATEGORIES if num_rows < limit), "n>1T")


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.2f} MB" if num_bytes >= 10_000 else f"{num_bytes} bytes"


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows if value not in (None, "")]
    return "\n".join(lines)


def _dataset_link(name: str | None) -> str | None:
    if not name:
        return None
    return f"[{name}]({constants.ENDPOINT}/datasets/{name})" if "/" in name else f"`{name}`"


def _tracked_summary(parameters: list[list[Any]]) -> str:
    total = 0
    for _, shape in parameters:
        count = 1
        for size in shape:
            count *= int(size)
        total += count
    ranks = sorted({int(shape[0]) for name, shape in parameters if ".lora_A." in f".{name}." and shape})
    lora = f", LoRA rank {'/'.join(map(str, ranks))}" if ranks else ""
    return f"{len(parameters)} tensors, {total:,} values{lora}"


#: the config fields a user sets: every field of :class:`DMinConfig` up to ``adapter`` (the rest are resolved)
_FIELD_NAMES = [field.name for field in dataclasses.fields(DMinConfig)]
USER_FIELDS = tuple(_FIELD_NAMES[: _FIELD_NAMES.index("adapter") + 1])
#: the resolved fields that describe the vectors, published beside the user's settings
RESOLVED_FIELDS = ("family", "objective", "timesteps", "num_train_timesteps", "parameter_fingerprint")
#: where the timesteps sit, for each ``timestep_spacing``
SPACING_TEXT = {
    "centres": "at the centres of T equal slices of the {steps}-step training schedule",
    "linspace": "evenly spaced over the {steps}-step training schedule, from 0 to its last step",
    "cubic": "packed at high noise, (N - 1)(1 - (i / T)^3) for i = 1..T of the {steps}-step training schedule",
}
#: the fixed noise, for each ``noise`` mode
NOISE_TEXT = {
    "shared": "one fixed Gaussian noise tensor drawn from the seed, the same for every timestep and row",
    "per_timestep": "a fixed Gaussian noise tensor of its own for each timestep, drawn from the seed, the same for "
                    "every row",
}


def card_settings(config: DMinConfig, knn_dim: int, num_rows: int) -> dict[str, Any]:
    """The card's ``dmin`` metadata: every user-settable field of ``config`` (``knn_dim`` as used), the resolved
    fields that describe the vectors, and the row count."""
    settings = {name: getattr(config, name) for name in (*USER_FIELDS, *RESOLVED_FIELDS)}
    return {**settings, "knn_dim": knn_dim, "rows": num_rows}


def _setting_value(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{item}`" for item in value) or "none"
    return f"`{value}`"


def output_function_text(config: DMinConfig) -> str:
    """What the gradient was taken of: the registered output function's description, with the objective named."""
    return output_function_named(config.output_function).description.replace("{objective}", str(config.objective))


def preconditioning_text(config: DMinConfig) -> str:
    """How a row's influence on a query is computed: the registered preconditioning's description."""
    return preconditioning_named(config.preconditioning).description.format(damping=config.preconditioning_damping)


def describe_recipe(config: DMinConfig) -> str:
    """How the vectors were computed, in words: preprocessing, timesteps, noise and the output function."""
    steps = config.num_train_timesteps
    explicit = steps is not None and config.timesteps != spread_timesteps(
        config.num_timesteps, steps, config.timestep_spacing)
    where = ("at explicitly chosen timesteps" if explicit
             else SPACING_TEXT[config.timestep_spacing].format(steps=steps or "N"))
    draws = f", averaged over {config.noise_draws} noise draws per timestep" if config.noise_draws > 1 else ""
    crop = "center-cropped" if config.center_crop else "cropped at the top-left corner"
    output = output_function_text(config)
    return (
        f"Every training row (image, prompt) went through the model as in training: the image resized "
        f"({config.image_interpolation_mode}) and {crop} to {config.resolution} pixels, at {config.num_timesteps} "
        f"timesteps {where} ({', '.join(map(str, config.timesteps or []))}), with {NOISE_TEXT[config.noise]}{draws}. "
        f"The gradient of {output} was taken with respect to the tracked parameters; each timestep's gradient was "
        "L2-normalised and compressed to K values (a keyed permutation, random signs and group sums), giving one "
        "row of T x K values per training row. A query image goes through the same steps, and a row's influence "
        f"on it is {preconditioning_text(config)}."
    )


@dataclass
class IndexSummary:
    """What the card says about an index: its config, dataset reference and manifest, and sizes."""

    config: DMinConfig
    dataset_info: dict[str, Any]
    manifest: dict[str, Any]
    num_rows: int
    knn_dim: int
    total_bytes: int


def usage_snippet(config: DMinConfig, repo_id: str, repo_type: str = DEFAULT_REPO_TYPE, subfolder: str | None = None) -> str:
    """Python that loads the index from ``repo_id`` into its pipeline and attributes an image."""
    family = family_named(config.family or "")
    ready_made = family.ready_made if family is not None else None
    cls = f"dm.{ready_made.__name__}" if ready_made is not None else "DiffusionPipeline"
    extra = "".join(
        f", {key}={value!r}" for key, value in (("repo_type", repo_type), ("subfolder", subfolder))
        if value and value != (DEFAULT_REPO_TYPE if key == "repo_type" else None)
    )
    lines = ["import dmin_diffusers as dm"] + ([] if ready_made else ["from diffusers import DiffusionPipeline"])
    lines += ["", f'pipe = {cls}.from_pretrained("{config.base_model or "<base model>"}")']
    if ready_made is None:
        lines.append("pipe = dm.enable_attribution(pipe)  # after registering its family with dm.register_family")
    if config.adapter:
        lines.append(f'pipe.load_lora_weights("{config.adapter}")')
    lines.append(f'pipe.load_attribution_index("{repo_id}"{extra})')
    takes_prompt = family.takes_prompt if family is not None else True
    call = "pipe.attribute(image, prompt, top_k=10)" if takes_prompt else "pipe.attribute(image, top_k=10)"
    lines += [
        f"result = {call}  # exact=True scores every row",
        "result.indices, result.scores  # training-row indices, most influential first",
        "result.examples                 # the training rows, loaded from the dataset on the Hub",
    ]
    return "\n".join(lines)


def _card_data(index: IndexSummary, num_rows: int) -> DatasetCardData:
    """The card's YAML metadata."""
    config, dataset_name = index.config, index.dataset_info.get("name")
    return DatasetCardData(
        pretty_name=f"DMin attribution index of {dataset_name or 'a training set'}",
        tags=list(CARD_TAGS) + ([config.family] if config.family else []),
        size_categories=size_category(num_rows),
        source_datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
        viewer=False,
        base_model=config.base_model,
        dmin=card_settings(config, index.knn_dim, num_rows),
    )


def _model_rows(config: DMinConfig) -> list[tuple[str, Any]]:
    return [
        ("base model", f"`{config.base_model}`" if config.base_model else "not recorded"),
        ("adapter", f"`{config.adapter}`" if config.adapter else None),
        ("pipeline family", config.family),
        ("tracked parameters", _tracked_summary(config.parameters or [])),
        ("weights dtype when built", config.denoiser_dtype),
        ("parameter fingerprint", f"`{config.parameter_fingerprint}`"),
    ]


def _data_rows(info: dict[str, Any], num_rows: int) -> list[tuple[str, Any]]:
    return [
        ("dataset", _dataset_link(info.get("name")) or "a local dataset (not on the Hub)"),
        ("config", info.get("config_name")),
        ("revision", f"`{info['revision']}`" if info.get("revision") else "not pinned"),
        ("split", info.get("split")),
        ("row selection", f"`{info['selection']}`" if info.get("selection") else None),
        ("rows", f"{num_rows:,}"),
        ("image column", f"`{info.get('image_column')}`" if info.get("image_column") else None),
        ("caption column", f"`{info.get('caption_column')}`" if info.get("caption_column") else None),
    ]


def _setting_rows(config: DMinConfig, knn_dim: int, num_rows: int) -> list[tuple[str, Any]]:
    shown_elsewhere = ("base_model", "adapter", "family", "parameter_fingerprint")  # in the model table
    return [
        (f"`{name}`", _setting_value(value)) for name, value in card_settings(config, knn_dim, num_rows).items()
        if name not in shown_elsewhere and name != "rows"
    ]


def _storage_rows(index: IndexSummary) -> list[tuple[str, Any]]:
    config, manifest = index.config, index.manifest
    files = manifest.get("files", {})
    shard_bytes = sum(int(shard["bytes"]) for shard in manifest.get("shards", []))
    knn_bytes = sum(int(files.get(name, {}).get("bytes", 0)) for name in KNN_FILES)
    return [
        ("rows x values", f"{index.num_rows:,} x {config.row_dim:,} ({config.storage_dtype})"),
        ("vector shards", f"{len(manifest.get('shards', []))} safetensors files, {_megabytes(shard_bytes)}"),
        ("HNSW files", _megabytes(knn_bytes) if knn_bytes else "not included (rebuilt on first use)"),
        ("total", _megabytes(index.total_bytes)),
    ]


_CARD_BODY = """
# {title}

A [DMin]({paper}) training-data attribution index, made with
[dmin-diffusers](https://pypi.org/project/dmin-diffusers/): for an image generated by the model below, it finds
the training rows that influenced it most, in milliseconds, without recomputing any training gradient.

## Model

{model}

## Training data

{data}

## DMin settings

{settings}

## Storage

{storage}

## How it was built

{recipe}
The rows are stored in safetensors shards listed in `manifest.json`
with the sha256 and size of every file, checked when the index is loaded.

## Usage

```python
{usage}
```

The pipeline must be the one the index was built for: its tracked parameters (names, shapes and values), the
rest of its denoiser and its training objective are compared with `dmin_config.json`, and a mismatch is refused
unless `strict=False` is passed.
"""


def make_index_card(
    index: IndexSummary, repo_id: str, repo_type: str = DEFAULT_REPO_TYPE, subfolder: str | None = None
) -> DatasetCard:
    """A dataset card describing an index: model, training data, DMin settings, storage, how it was built and how
    to use it. Its metadata carries :data:`CARD_TAGS`, ``viewer: false`` (the files are not a table) and the
    DMin settings under ``dmin``."""
    config = index.config
    num_rows = int(index.dataset_info.get("num_rows") or index.num_rows)
    data = _card_data(index, num_rows)
    body = _CARD_BODY.format(
        title=data.pretty_name, paper=PAPER_URL, model=_table(_model_rows(config)),
        data=_table(_data_rows(index.dataset_info, num_rows)),
        settings=_table(_setting_rows(config, index.knn_dim, num_rows)), storage=_table(_storage_rows(index)),
        recipe=describe_recipe(config), usage=usage_snippet(config, repo_id, repo_type, subfolder),
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")

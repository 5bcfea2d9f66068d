"""The training rows of diffusers' example scripts, in the order and selection the scripts used.

Row numbers in an index are positions in this dataset, so they must match the training run: the same
source, the same ``train`` split, and for ``max_train_samples`` the same ``shuffle(seed).select(range(n))``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

#: where a training run's attribution index goes inside its ``--output_dir`` (the callback and ``dmin cache``)
INDEX_SUBFOLDER = "dmin-index"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_training_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    instance_data_dir: str | None = None,
    instance_prompt: str | None = None,
    cache_dir: str | None = None,
    max_train_samples: int | None = None,
    seed: int | None = None,
    revision: str | None = None,
) -> datasets.Dataset:
    """Loads the ``train`` split as diffusers' training scripts do.

    - ``dataset_name``: ``load_dataset(dataset_name, dataset_config_name, data_dir=train_data_dir)["train"]``
      (``revision`` pins the dataset version).
    - ``train_data_dir`` alone: an ``imagefolder`` (captions from a ``metadata.jsonl`` beside the images).
    - ``instance_data_dir`` + ``instance_prompt`` (DreamBooth): the folder's images, sorted by name, each with
      the instance prompt in a ``"text"`` column. (The DreamBooth scripts list the folder unsorted, so their row
      order depends on the file system; a sorted order is reproducible.)
    - ``max_train_samples``: ``shuffle(seed=seed).select(range(max_train_samples))``, as the text-to-image scripts.
    """
    if dataset_name:
        dataset = datasets.load_dataset(
            dataset_name, dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir, revision=revision
        )["train"]
        if instance_prompt is not None and "text" not in dataset.column_names:
            # DreamBooth scripts without --caption_column give every row the instance prompt
            dataset = dataset.add_column("text", [instance_prompt] * len(dataset))
    elif train_data_dir:
        _require_directory("train_data_dir", train_data_dir)
        dataset = datasets.load_dataset(
            "imagefolder", data_files={"train": os.path.join(train_data_dir, "**")}, cache_dir=cache_dir
        )["train"]
    elif instance_data_dir:
        if not instance_prompt:
            raise ValueError("instance_data_dir needs instance_prompt (the caption of every instance image)")
        _require_directory("instance_data_dir", instance_data_dir)
        paths = sorted(p for p in Path(instance_data_dir).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"no images in {instance_data_dir}")
        dataset = datasets.Dataset.from_dict(
            {"image": [str(p) for p in paths], "text": [instance_prompt] * len(paths)}
        ).cast_column("image", datasets.Image())
    else:
        raise ValueError("give dataset_name, train_data_dir or instance_data_dir")
    if max_train_samples is not None:
        if seed is None:
            raise ValueError("max_train_samples selects rows with shuffle(seed=...): pass the training seed too")
        dataset = dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))
    return dataset


def _require_directory(name: str, path: str | os.PathLike) -> None:
    """Refuses (``FileNotFoundError``) a data directory that does not exist, before anything is read."""
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"{name} {str(path)!r} {what}; pass the folder of training images")


def dataset_reference(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    revision: str | None = None,
    max_train_samples: int | None = None,
    seed: int | None = None,
    data_dir: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    """What an index records about where its rows come from (for finding them again later)."""
    reference: dict[str, Any] = {
        "name": dataset_name, "config_name": dataset_config_name, "revision": revision, "split": "train"
    }
    if data_dir is not None:
        reference["data_dir"] = data_dir
    if max_train_samples is not None:
        reference["selection"] = f"shuffle(seed={seed}).select(range({max_train_samples}))"
    return reference


def raw_rows(dataset: datasets.Dataset) -> datasets.Dataset:
    """The dataset without the transform a training script attached (``with_transform``/``set_format``)."""
    return dataset.with_format(None) if dataset.format.get("type") is not None else dataset

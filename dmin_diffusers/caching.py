"""Caching a dataset's DMin vectors: resumable, and split across processes under `accelerate`."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from tqdm.auto import tqdm

from .config import DMinConfig
from .families import detect_family
from .gradients import GradientSketcher, resolve_config
from .index import AttributionIndex, describe_dataset, prepare_index_directory
from .store import VectorStoreWriter, merge_manifests

logger = logging.getLogger(__name__)
DEFAULT_CAPTION_COLUMN = "text"


def check_dataset(dataset: Any, image_column: str, caption_column: str | None, takes_prompt: bool) -> str | None:
    """Validates the dataset and returns the caption column to use (``None`` for unconditional models)."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"dataset must be a datasets.Dataset (rows are addressed by position), got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    caption_column = (caption_column or DEFAULT_CAPTION_COLUMN) if takes_prompt else None
    for role, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"{role} {column!r} is not a column of the dataset; its columns are {dataset.column_names}"
            )
    return caption_column


def cache_dataset(
    pipeline: Any,
    dataset: Any,
    output_dir: str | os.PathLike,
    config: DMinConfig | None = None,
    image_column: str = "image",
    caption_column: str | None = None,
    accelerator: Any = None,
    dataset_reference: dict[str, Any] | None = None,
    progress: bool = True,
) -> AttributionIndex:
    """Writes the DMin vectors of every row of ``dataset`` to ``output_dir`` and builds the HNSW index.

    Rows already in ``output_dir`` (from an interrupted run with the same settings) are skipped. With an
    ``accelerate.Accelerator`` (or ``PartialState``) of N processes, each process caches a contiguous slice of
    the remaining rows into its own shards, and the main process merges them and builds the HNSW index once.
    Every process returns the finished index.
    """
    family = detect_family(pipeline)
    caption_column = check_dataset(dataset, image_column, caption_column, family.takes_prompt)
    config = resolve_config(config or DMinConfig(), family)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = rank == 0
    if is_main:
        prepare_index_directory(output_dir, config, describe_dataset(dataset, image_column, caption_column,
                                                                     dataset_reference))
    _wait(accelerator)
    if not is_main:  # the main process has checked the directory; the others only need it to match
        prepare_index_directory(output_dir, config, describe_dataset(dataset, image_column, caption_column,
                                                                     dataset_reference))
    sketcher = GradientSketcher(family, config)
    writer = VectorStoreWriter(
        output_dir, config.row_dim, config.storage_dtype, config.shard_size, name=f"part-{rank:03d}-of-{world:03d}"
    )
    remaining = [row for row in range(len(dataset)) if row not in writer.done]
    share = -(-len(remaining) // world)
    mine = remaining[rank * share : (rank + 1) * share]
    rows = dataset.select_columns([c for c in (image_column, caption_column) if c is not None])
    bar = tqdm(
        total=len(dataset), initial=len(dataset) - len(remaining), disable=not (progress and is_main),
        unit="row", desc="Caching DMin gradients", smoothing=0.1,
    )
    start = time.perf_counter()
    try:
        for row_id in mine:
            row = rows[row_id]
            example = sketcher.prepare(row[image_column], row[caption_column] if caption_column else None)
            writer.add(row_id, sketcher.sketch(example))
            bar.update(world)  # the other processes advance at about the same pace
    finally:
        writer.flush()  # keep every finished row, even when a row fails
        bar.close()
    _wait(accelerator)
    if is_main:
        merge_manifests(output_dir)
        index = AttributionIndex(output_dir, dataset=dataset)
        index.build_knn()
        seconds = time.perf_counter() - start
        message = (
            f"DMin cache: {index.num_rows} rows in {output_dir} ({len(remaining)} computed in {seconds:.1f} s "
            f"by {world} process{'es' if world > 1 else ''}, {index.nbytes / 1e6:.2f} MB on disk)"
        )
        logger.info(message)
        if progress:
            print(message)
    _wait(accelerator)
    return AttributionIndex(output_dir, dataset=dataset)


def _wait(accelerator: Any) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()

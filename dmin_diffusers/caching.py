"""Caching a dataset's DMin vectors: resumable, and split across processes under `accelerate`."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .build_directory import check_not_foreign, describe_dataset, prepare_index_directory
from .config import DMinConfig, require_config
from .families import detect_family
from .gradients import DEFAULT_BATCH_BYTES, GradientSketcher
from .index import AttributionIndex
from .locks import LOCK_NAME, index_write_lock
from .resolution import resolve_config
from .store import VectorStoreWriter, merge_manifests
from .training_data import raw_rows

logger = logging.getLogger(__name__)
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_CAPTION_COLUMN = "text"  # the column name of diffusers' training scripts and imagefolder captions


def require_dataset(dataset: Any) -> None:
    """Refuses anything but a ``datasets.Dataset`` (``TypeError``), saying what to pass instead of the usual
    near misses: a ``DatasetDict``, a streaming ``IterableDataset`` or a torch ``DataLoader``."""
    import datasets
    import torch.utils.data

    if isinstance(dataset, datasets.Dataset):
        return
    expected = "dataset must be a datasets.Dataset (rows are addressed by position)"
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(
            f"{expected}, got a {type(dataset).__name__} of the splits {list(dataset)}: pass the split, "
            "e.g. dataset['train']"
        )
    if isinstance(dataset, datasets.IterableDataset):
        raise TypeError(f"{expected}, got a streaming IterableDataset: load the dataset without streaming=True")
    if isinstance(dataset, torch.utils.data.DataLoader):
        raise TypeError(
            f"{expected}, got a torch {type(dataset).__name__}: pass its dataset, a datasets.Dataset "
            "(e.g. train_dataloader.dataset)"
        )
    raise TypeError(f"{expected}, got {type(dataset).__name__}")


def check_dataset(dataset: Any, image_column: str, caption_column: str | None, takes_prompt: bool) -> str | None:
    """Validates the dataset and returns the caption column to use (``None`` for unconditional models).

    Besides the type and the column names, checks the columns' feature types (captions must be strings) and that
    no row lacks its image or caption, so that a bad dataset is refused before anything is computed or written.
    """
    import datasets

    require_dataset(dataset)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    caption_column = (caption_column or DEFAULT_CAPTION_COLUMN) if takes_prompt else None
    for role, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"{role} {column!r} is not a column of the dataset; its columns are {dataset.column_names}"
            )
    strings = ("string", "large_string")
    image_feature = dataset.features[image_column]
    if isinstance(image_feature, datasets.Value) and image_feature.dtype in strings:
        raise TypeError(
            f"image_column {image_column!r} holds strings (file paths?), not images: decode them with "
            f"dataset.cast_column({image_column!r}, datasets.Image())"
        )
    if caption_column is not None:
        feature = dataset.features[caption_column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in strings):
            raise TypeError(
                f"caption_column {caption_column!r} must hold strings (datasets.Value('string')), but its feature is "
                f"{feature}: pass the column of captions with caption_column=..."
            )
    for column, what in ((image_column, "image"), (caption_column, "caption")):
        if column is not None:
            missing, first = _missing_values(dataset, column)
            if missing:
                raise ValueError(
                    f"row {first} of the dataset has no {what} (None in column {column!r}"
                    + (f", and {missing - 1} more rows" if missing > 1 else "")
                    + f"): give every row one, or drop those rows with "
                    f"dataset.filter(lambda row: row[{column!r}] is not None)"
                )
    return caption_column


def _missing_values(dataset: Any, column: str, batch_size: int = 65536) -> tuple[int, int | None]:
    """How many rows have ``None`` in ``column``, and the position of the first (read as Arrow, not decoded)."""
    view = dataset.select_columns([column]).with_format("arrow")
    missing, first = 0, None
    for start in range(0, len(view), batch_size):
        values = view[start : start + batch_size].column(0)
        if values.null_count:
            if first is None:
                first = start + values.is_null().to_pylist().index(True)
            missing += values.null_count
    return missing, first


def cache_dataset(
    pipeline: Any,
    dataset: Any,
    output_dir: str | os.PathLike,
    config: DMinConfig | None = None,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    caption_column: str | None = None,
    accelerator: Any = None,
    dataset_reference: dict[str, Any] | None = None,
    progress: bool = True,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    replace_stale: bool = False,
) -> AttributionIndex:
    """Writes the DMin vectors of every row of ``dataset`` to ``output_dir`` and builds the HNSW index.

    Rows already in ``output_dir`` (from an interrupted run with the same settings) are skipped; an index there
    built with other settings or on another dataset is refused, or, with ``replace_stale=True`` (a training re-run
    into the same output directory), deleted with a warning and built anew. With an ``accelerate.Accelerator`` (or
    ``PartialState``) of N processes, each process caches a contiguous slice of the remaining rows into its own
    shards, and the main process merges them and builds the HNSW index once. Every process returns the finished
    index. The timesteps of several rows are differentiated in one batched
    backward of at most ``batch_bytes`` (see :class:`~dmin_diffusers.gradients.GradientSketcher`; ``0`` computes
    one (row, timestep) at a time). The main process holds the directory's write lock
    (:func:`~dmin_diffusers.locks.index_write_lock`) throughout, so another build or save there is refused.

    The rows are read raw: a transform attached with ``with_transform`` / ``set_format`` (a training script's
    random crops and flips) is dropped, with a warning, and every row is preprocessed as ``config`` says.
    """
    config = require_config(config)
    family = detect_family(pipeline)
    caption_column = check_dataset(dataset, image_column, caption_column, family.takes_prompt)
    dataset = _without_transform(dataset)
    config = resolve_config(config, family)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = rank == 0
    with contextlib.ExitStack() as held:
        if is_main:  # one build at a time in a directory: a second one is refused, never interleaved
            _lock_directory(held, Path(output_dir))
        dataset_info = describe_dataset(dataset, image_column, caption_column, dataset_reference)
        if is_main:  # under the lock: what a racing writer left half-written is never mistaken for a foreign folder
            prepare_index_directory(output_dir, config, dataset_info, replace_stale=replace_stale)
        _wait(accelerator)
        if not is_main:  # the main process has checked the directory; the others only need it to match
            prepare_index_directory(output_dir, config, dataset_info)
        sketcher = GradientSketcher(family, config, batch_bytes=batch_bytes)
        writer = VectorStoreWriter(output_dir, config.row_dim, config.storage_dtype, config.shard_size,
                                   name=f"part-{rank:03d}-of-{world:03d}", block_size=config.projection_dim)
        _wait(accelerator)  # every process has read the finished rows before any writes more: all split them alike
        remaining = [row for row in range(len(dataset)) if row not in writer.done]
        start = time.perf_counter()
        _cache_rows(sketcher, writer, dataset, remaining, (rank, world), (image_column, caption_column),
                    progress and is_main)
        _wait(accelerator)
        if is_main:
            _finish(output_dir, config, len(remaining), start, world)
    _wait(accelerator)
    index = AttributionIndex(output_dir)
    index.dataset = dataset  # the rows digested into dataset.json above: no second pass over every image
    return index


def _cache_rows(sketcher: GradientSketcher, writer: VectorStoreWriter, dataset: Any, remaining: list[int],
                process: tuple[int, int], columns: tuple[str, str | None], progress: bool) -> None:
    """Sketches and writes this process's contiguous slice of the ``remaining`` rows (``process`` is its rank and
    the number of processes), as many rows at a time as share one batched backward (the first alone: it measures
    how many fit). Every finished row is kept, even when a row fails."""
    (rank, world), (image_column, caption_column) = process, columns
    share = -(-len(remaining) // world)
    row_ids = remaining[rank * share : (rank + 1) * share]
    rows = dataset.select_columns([c for c in columns if c is not None])
    bar = tqdm(total=len(dataset), initial=len(dataset) - len(remaining), disable=not progress, unit="row",
               desc="Caching DMin gradients", smoothing=0.1)
    position, group_size = 0, 1
    try:
        while position < len(row_ids):
            group = row_ids[position : position + group_size]
            position += len(group)
            examples = []
            try:
                for row_id in group:
                    with _naming_rows([row_id]):
                        row = rows[row_id]
                        caption = row[caption_column] if caption_column else None
                        examples.append(sketcher.prepare(row[image_column], caption))
            except Exception:
                _write_rows(sketcher, writer, group, examples)  # the rows before the failing one are kept
                raise
            _write_rows(sketcher, writer, group, examples)
            bar.update(world * len(group))  # the other processes advance at about the same pace
            group_size = max(1, sketcher.batch_samples // len(sketcher.config.timesteps))  # rows sharing a backward
    finally:
        try:
            writer.flush()  # keep every finished row, even when a row fails
        finally:
            bar.close()


def _finish(output_dir: str | os.PathLike, config: DMinConfig, computed: int, start: float, world: int) -> None:
    """Merges the writers' manifests, fits the preconditioner and HNSW index from the rows and logs what the build
    did since ``start`` (the main process)."""
    merge_manifests(output_dir)
    index = AttributionIndex(output_dir)
    # the preconditioner and HNSW index, from the rows; a resumed build may ask for another preconditioning
    index.refit(config.preconditioning, config.preconditioning_damping)
    seconds = time.perf_counter() - start
    megabytes = sum((index.directory / name).stat().st_size for name in index.files()) / 1e6
    logger.info(
        f"DMin cache: {index.num_rows} rows in {output_dir} ({computed} computed in {seconds:.1f} s by "
        f"{world} process{'es' if world > 1 else ''}, {megabytes:.2f} MB on disk)"
    )


def _without_transform(dataset: Any) -> Any:
    """The dataset's raw rows (:func:`~dmin_diffusers.training_data.raw_rows`), with a warning when a transform or
    format was dropped: a random augmentation would give a row another vector on every build."""
    raw = raw_rows(dataset)
    if raw is not dataset:
        logger.warning(
            f"cache_dataset drops the dataset's {dataset.format['type']!r} format (with_transform / set_format) and "
            "reads its raw rows: random augmentations would change a row's vector from one build to the next; "
            "every row is resized and center-cropped as the DMin config says, never flipped"
        )
    return raw


def _lock_directory(held: contextlib.ExitStack, directory: Path) -> None:
    """Takes the write lock of ``directory`` into ``held``. A folder that never held the lock file (nothing of this
    package was written there) is checked first, so a foreign folder gets no lock file; every other check of the
    directory waits for the lock, because a racing writer's files are half-written until it releases it."""
    if not (directory / LOCK_NAME).exists():
        check_not_foreign(directory)
    held.enter_context(index_write_lock(directory))


def _write_rows(sketcher: GradientSketcher, writer: VectorStoreWriter, row_ids: list[int], examples: list) -> None:
    """Sketches the prepared ``examples`` (the first rows of ``row_ids``) and hands them to the writer."""
    if examples:
        with _naming_rows(row_ids[: len(examples)]):
            vectors = sketcher.sketch_many(examples, same_size_batches=True)
        for row_id, row_vectors in zip(row_ids, vectors):
            writer.add(row_id, row_vectors)


@contextlib.contextmanager
def _naming_rows(row_ids: list[int]):
    """Adds the failing row (or rows, for a batch) to an exception's notes."""
    try:
        yield
    except Exception as error:
        if hasattr(error, "add_note"):  # Python 3.11+
            what = f"row {row_ids[0]}" if len(row_ids) == 1 else f"rows {row_ids[0]} to {row_ids[-1]}"
            error.add_note(f"(while caching {what}; the rows finished before it are kept)")
        raise


def _wait(accelerator: Any) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()

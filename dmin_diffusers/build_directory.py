"""An attribution index's directory on disk, as builds and saves find it: which files belong to an index, whether
a directory may be written into, what a build records about its dataset, and preparing a directory for a build (a
new one, a resumed one, or a stale index replaced).

:mod:`~dmin_diffusers.caching` prepares its output directory here; :class:`~dmin_diffusers.index.AttributionIndex`
uses the same checks before it saves into a directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .artefacts import ARTEFACT_FILES
from .config import CONFIG_NAME, DMinConfig
from .dataset_rows import infer_hub_reference
from .fingerprints import dataset_digest
from .hub import DATASET_INFO_NAME
from .locks import LOCK_NAME, check_not_busy
from .store import (
    MANIFEST_NAME,
    SHARD_DIR,
    TEMPORARY_SUFFIX,
    disk_full_guard,
    read_json_object,
    write_json_atomic,
)

logger = logging.getLogger(__name__)
STAGING_NAME = ".dmin-staging"  # inside a save_pretrained target: the new index, complete before it replaces the old


def index_entries(directory: Path) -> tuple[list[Path], list[Path]]:
    """The files of ``directory`` that belong to an index (or its build), and those that do not."""
    known = {CONFIG_NAME, DATASET_INFO_NAME, MANIFEST_NAME, *ARTEFACT_FILES, LOCK_NAME, STAGING_NAME, SHARD_DIR}
    ours, foreign = [], []
    for path in directory.iterdir() if directory.is_dir() else []:
        if path.name == SHARD_DIR and path.is_dir():
            for inner in path.iterdir():
                is_ours = inner.is_file() and inner.name.endswith((".safetensors", ".json", TEMPORARY_SUFFIX))
                (ours if is_ours else foreign).append(inner)
        elif path.name in known or path.name.endswith(TEMPORARY_SUFFIX):
            ours.append(path)
        else:
            foreign.append(path)
    return ours, foreign


def describe_dataset(
    dataset: Any, image_column: str, caption_column: str | None, reference: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What an index records about its training dataset: its size, columns and ``content_digest``, the digest of
    every row's image content and caption (:func:`~dmin_diffusers.fingerprints.dataset_digest`). ``reference`` may
    add where it comes from (``name``, ``config_name``, ``revision``, ``split``, ``selection``), so that rows can be
    found again without the dataset object; without it, a dataset loaded from the Hub with ``load_dataset`` is
    recognised by where ``datasets`` cached it (repository id, config and commit)."""
    info = getattr(dataset, "info", None)
    described = {
        "num_rows": len(dataset),
        "image_column": image_column,
        "caption_column": caption_column,
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "content_digest": dataset_digest(dataset, [c for c in (image_column, caption_column) if c]),
        "name": getattr(info, "dataset_name", None),
        "config_name": getattr(info, "config_name", None),
        "revision": None,
        "split": str(dataset.split) if getattr(dataset, "split", None) is not None else None,
    }
    inferred = infer_hub_reference(dataset)
    given = {key: value for key, value in (reference or {}).items() if value is not None}
    if given.get("name") not in (None, inferred.get("name")):
        inferred = {}  # the reference names another dataset: its revision is not the cached one
    described.update(inferred)
    described.update(given)
    return described


def check_not_foreign(directory: Path) -> None:
    """Refuses a directory that another process is writing (:class:`~dmin_diffusers.locks.IndexBusyError`, judged
    before its files, which are half-written while it works) or that holds files but no attribution index
    (``ValueError``)."""
    directory = Path(directory)
    if not directory.exists():
        return
    check_not_busy(directory)
    if (directory / CONFIG_NAME).exists():
        return
    if any(path.name not in (LOCK_NAME, STAGING_NAME) for path in directory.iterdir()):
        check_not_busy(directory)  # the lock may have been taken while the directory was listed
        raise ValueError(f"{directory} is not empty and is not an attribution index; refusing to write into it")


def _stale_reasons(directory: Path, config: DMinConfig, dataset_info: dict) -> list[str]:
    """How the index in ``directory`` differs from the one ``config`` and ``dataset_info`` describe."""
    existing = DMinConfig.from_dict(read_json_object(directory / CONFIG_NAME, CONFIG_NAME, str(directory)))
    reasons = [f"settings: {difference}" for difference in existing.differences(config)]
    info_path = directory / DATASET_INFO_NAME
    existing_info = read_json_object(info_path, DATASET_INFO_NAME, str(directory)) if info_path.exists() else {}
    for key in ("num_rows", "image_column", "caption_column", "content_digest"):
        if key == "content_digest" and existing_info.get(key) is None:  # recorded since version 0.2
            continue
        if existing_info.get(key) != dataset_info.get(key):
            reasons.append(f"dataset: {key} {existing_info.get(key)!r} != {dataset_info.get(key)!r}")
    return reasons


def _remove_index(directory: Path) -> None:
    """Deletes the index files of ``directory`` (the manifest first, so it is never listing deleted files); the
    config and dataset reference are then overwritten by the new build. Refuses anything not an index file."""
    ours, foreign = index_entries(directory)
    if foreign:
        raise ValueError(
            f"{directory} holds files that are not part of an attribution index ({foreign[0].name}, ...); "
            "refusing to delete the stale index there: move them away or use another output directory"
        )
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    for path in ours:
        if path.name in (CONFIG_NAME, DATASET_INFO_NAME, LOCK_NAME, SHARD_DIR):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def prepare_index_directory(
    directory: str | os.PathLike, config: DMinConfig, dataset_info: dict, replace_stale: bool = False
) -> None:
    """Makes ``directory`` ready for building, or checks that the index already there can be resumed.

    Refuses (``ValueError``) a directory with other files in it, an index built with other settings, or one
    built on another dataset, so a call never overwrites or mixes rows it did not write. With
    ``replace_stale=True``, such a stale index is deleted instead (its index files only; a directory that also
    holds other files is still refused), with a warning naming the differences, and a fresh build starts. The
    caller holds the directory's write lock.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    no_rows = not (directory / DATASET_INFO_NAME).exists() and not any((directory / SHARD_DIR).glob("*.json"))
    if config_path.exists() and no_rows and not (directory / MANIFEST_NAME).exists():
        pass  # a build interrupted between writing its config and its dataset reference: start it again
    elif config_path.exists():
        reasons = _stale_reasons(directory, config, dataset_info)
        if not reasons:
            return
        if not replace_stale:
            settings = [reason for reason in reasons if reason.startswith("settings: ")]
            if settings:
                raise ValueError(
                    f"{directory} already holds an index built with other settings "
                    f"({'; '.join(reason[len('settings: '):] for reason in settings)}); use another output "
                    "directory or delete it"
                )
            raise ValueError(
                f"{directory} already holds an index of another dataset ({reasons[0][len('dataset: '):]}); use "
                "another output directory"
            )
        logger.warning("%s holds a stale attribution index (%s): deleting it and building a new one",
                       directory, "; ".join(reasons))
        _remove_index(directory)
    else:
        check_not_foreign(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with disk_full_guard(directory, "nothing was computed yet"):  # the config first: it marks the directory ours
        write_json_atomic(config_path, config.to_dict())
        write_json_atomic(directory / DATASET_INFO_NAME, dataset_info)

"""`AttributionIndex`: a resolved config, the stored rows, the HNSW index and a reference to the dataset.

An index is a directory (local, or a snapshot of a Hub repository in the ``huggingface_hub`` cache) holding
``dmin_config.json``, ``dataset.json``, ``manifest.json`` (the sha256 and size of every other file),
``vectors/*.safetensors`` and, optionally, ``knn.bin`` (hnswlib). Only JSON, safetensors and the hnswlib file are
ever read, and the hnswlib file only after :func:`~dmin_diffusers.knn_file.check_knn_file` has validated it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import CommitInfo

from .card import IndexSummary, make_index_card
from .config import CONFIG_NAME, DMinConfig
from .dataset_rows import HubDatasetRows, infer_hub_reference
from .fingerprints import dataset_digest
from .hub import (
    DATASET_INFO_NAME,
    DEFAULT_MAX_COMMIT_BYTES,
    resolve_index_location,
    upload_index,
)
from .knn_file import check_knn_file
from .locks import LOCK_NAME, index_write_lock
from .knn_projection import KNN_PROJECTION_NAME, fit_projection, load_projection, sample_row_ids
from .search import KNN_FILES, KNN_NAME, KnnIndex, approximate_top_k, exact_top_k
from .store import (
    MANIFEST_NAME,
    SHARD_DIR,
    IndexIntegrityError,
    VectorStore,
    check_file_digest,
    check_shard_layout,
    read_manifest,
    record_files,
    verify_files,
    write_json_atomic,
)

logger = logging.getLogger(__name__)
CHECKSUMMED_FILES = (CONFIG_NAME, DATASET_INFO_NAME, *KNN_FILES)  # listed under "files" in the manifest
METADATA_FILES = (CONFIG_NAME, DATASET_INFO_NAME)  # small: their sha256 is checked every time an index is opened


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexIntegrityError(f"{path.name} in {path.parent} is not valid JSON ({error})") from None


class AttributionIndex:
    """Compressed training gradients of one dataset for one pipeline, ready to score queries.

    Use :meth:`from_pretrained` to open a saved index (a directory or a Hub repository), :meth:`save_pretrained`
    to copy it elsewhere and :meth:`push_to_hub` to publish it; a pipeline's ``build_attribution_index`` creates
    one and ``load_attribution_index`` attaches one.

    Opening an index checks every file the manifest lists: that it exists and has the listed size, and the sha256
    of the config and the dataset reference (everything the vectors and row ids depend on). Every row a query
    reads is checked against its digest in the shard (a shard without digests: its sha256, on first read), and
    ``knn.bin`` against its sha256 when it is loaded, so damage is reported
    as an :class:`~dmin_diffusers.store.IndexIntegrityError` before a damaged row can be ranked; ``verify=True``
    checks every file at once. A missing ``knn.bin`` is allowed: exact search needs only the rows, and
    :meth:`build_knn` rebuilds the HNSW index.

    Args:
        directory: where the index files live.
        dataset: the training ``datasets.Dataset``, optional; lets results return the training rows. Without it,
            rows come from the Hub dataset that ``dataset.json`` names, when there is one (:class:`HubDatasetRows`).
        verify: compare every file's sha256 with the manifest now (reads every byte once) instead of on first use.
        source: how to name the index in messages (a repository id and commit for Hub indices).
        read_only: never write into ``directory`` (a snapshot in the Hub cache); a rebuilt HNSW index then stays
            in memory until :meth:`save_pretrained`.
        token: Hub token, used for the training dataset when it is private.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        dataset: Any = None,
        *,
        verify: bool = False,
        source: str | None = None,
        read_only: bool = False,
        token: str | bool | None = None,
    ):
        self.directory = Path(directory)
        self.source = source or str(self.directory)
        self.read_only = read_only
        config_path = self.directory / CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(f"{self.source} is not an attribution index: {CONFIG_NAME} is missing")
        self.manifest: dict | None = read_manifest(self.directory)
        if self.manifest is not None:
            verify_files(self.directory, self.manifest, full=True if verify else METADATA_FILES, optional=KNN_FILES)
        try:
            self.config = DMinConfig.from_dict(_read_json(config_path))
        except TypeError as error:
            raise ValueError(f"{CONFIG_NAME} in {self.source} is not a DMin config ({error})") from None
        info_path = self.directory / DATASET_INFO_NAME
        self.dataset_info: dict[str, Any] = _read_json(info_path) if info_path.exists() else {}
        self.dataset: Any = HubDatasetRows(self.dataset_info, token=token)
        if dataset is not None:
            self.attach_dataset(dataset)
        self._store: VectorStore | None = None
        self._knn: KnnIndex | None = None

    def __repr__(self) -> str:
        return f"AttributionIndex({self.source!r}, rows={self.dataset_info.get('num_rows')}, config={self.config})"

    @classmethod
    def from_pretrained(
        cls,
        pretrained_index_name_or_path: str | os.PathLike,
        dataset: Any = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        repo_type: str = "dataset",
        subfolder: str | None = None,
        force_download: bool = False,
        verify: bool | None = None,
    ) -> "AttributionIndex":
        """Opens an index saved in a local directory, or downloads one from a Hub repository.

        Args:
            pretrained_index_name_or_path: a directory written by ``build_attribution_index`` /
                :meth:`save_pretrained`, or a Hub repository id (``"user/name"``) written by :meth:`push_to_hub`.
            dataset: the training ``datasets.Dataset`` (optional, see the class docstring).
            revision: branch, tag or commit of the repository (default ``main``).
            token: Hub token (default: the one ``huggingface_hub`` finds).
            cache_dir: ``huggingface_hub`` cache directory.
            local_files_only: use the cache only, never the network.
            repo_type: ``"dataset"`` (the default for indices), ``"model"`` or ``"space"``.
            subfolder: folder of the repository (or directory) that holds the index.
            force_download: download again even if cached.
            verify: check every file's sha256 against the manifest; by default only for Hub downloads (local
                files are always checked for presence and size).
        """
        location = resolve_index_location(
            pretrained_index_name_or_path, revision=revision, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, repo_type=repo_type, subfolder=subfolder,
            force_download=force_download,
        )
        return cls(
            location.directory, dataset=dataset, verify=location.from_hub if verify is None else verify,
            source=location.source, read_only=location.from_hub, token=token,
        )

    def files(self) -> list[str]:
        """The index's files, relative to its directory: metadata, vector shards and, if present, the HNSW files
        (the per-writer ``vectors/part-*.json`` lists used while building are not part of a finished index)."""
        names = [name for name in (CONFIG_NAME, DATASET_INFO_NAME, MANIFEST_NAME) if (self.directory / name).is_file()]
        names += [shard["file"] for shard in self.store.shards]
        return names + [name for name in KNN_FILES if (self.directory / name).is_file()]

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_kwargs: Any,
    ) -> CommitInfo | None:
        """Copies the index files (config, manifest, shards, HNSW files, dataset reference) to a directory; an
        HNSW index rebuilt in memory is written there too, and the manifest lists the checksums of every file.

        A directory that already holds another index is refused unless ``overwrite=True`` (its index files are
        then replaced); one that holds anything else is always refused. The directory's write lock is held while
        writing, so a concurrent build or save there fails with a clear error instead of mixing files.

        With ``push_to_hub=True`` the saved copy is then pushed to ``repo_id`` (default: the directory's name), with
        ``push_kwargs`` passed on to :meth:`push_to_hub`; the commit's :class:`~huggingface_hub.CommitInfo` is
        returned.
        """
        target = Path(save_directory)
        if not (target.exists() and target.resolve() == self.directory.resolve()):
            self._copy_to(target, overwrite)
        if not push_to_hub:
            return None
        saved = self if target.resolve() == self.directory.resolve() else AttributionIndex(target)
        return saved.push_to_hub(repo_id or target.resolve().name, **push_kwargs)

    def _copy_to(self, target: Path, overwrite: bool) -> None:
        check_not_foreign(target)
        with index_write_lock(target):
            existing = read_manifest(target) if (target / CONFIG_NAME).exists() else None
            if (target / CONFIG_NAME).exists() and existing != self.manifest:
                if not overwrite:
                    raise FileExistsError(
                        f"{target} already holds another attribution index; pass overwrite=True to replace it"
                    )
                for name in (CONFIG_NAME, DATASET_INFO_NAME, MANIFEST_NAME, *KNN_FILES):
                    (target / name).unlink(missing_ok=True)
                shutil.rmtree(target / SHARD_DIR, ignore_errors=True)
            (target / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            for name in self.files():
                shutil.copyfile(self.directory / name, target / name)
            if not (self.directory / KNN_NAME).is_file() and self._knn is not None:
                self._knn.save(target)
            record_files(target, list(CHECKSUMMED_FILES))

    def record_checksums(self) -> None:
        """Lists the sha256 and size of the config, the dataset reference and the HNSW files in the manifest
        (the shards are listed as they are written)."""
        if self.read_only:
            raise PermissionError(f"{self.source} is read-only (a Hub snapshot); save_pretrained it elsewhere first")
        self.manifest = record_files(self.directory, list(CHECKSUMMED_FILES))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        branch: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        repo_type: str = "dataset",
        subfolder: str | None = None,
        max_commit_bytes: int = DEFAULT_MAX_COMMIT_BYTES,
    ) -> CommitInfo:
        """Uploads the index, with a generated dataset card, to a Hub repository (created if needed).

        Args:
            repo_id: ``"user/name"`` (or ``"name"`` in your own namespace).
            private: visibility of a newly created repository.
            token: Hub token (default: the one ``huggingface_hub`` finds).
            branch: branch to push to; created from ``main`` when it does not exist.
            create_pr: open a pull request instead of committing to the branch (one commit).
            commit_message: message of the commit (default ``"Upload DMin attribution index"``).
            repo_type: ``"dataset"`` by default; ``"model"`` puts the index in a model repository (e.g. beside a
                LoRA, with ``subfolder``).
            subfolder: folder of the repository to put the index in; its card goes there too.
            max_commit_bytes: vector shards are committed in batches of at most this many bytes before the
                commit of the metadata, so a large upload can be resumed.

        Returns:
            the :class:`~huggingface_hub.CommitInfo` of the commit that holds the complete index.
        """
        if not self.read_only:
            self.record_checksums()
        self._check_complete()
        verify_files(self.directory, self.manifest, full=True, optional=KNN_FILES)  # never publish damage
        summary = IndexSummary(
            self.config, self.dataset_info, self.manifest, self.num_rows, self.knn_dim,
            sum((self.directory / name).stat().st_size for name in self.files()),
        )
        card = make_index_card(summary, repo_id, repo_type=repo_type, subfolder=subfolder)
        return upload_index(
            self.directory, repo_id, self.files(), card, private=private, token=token, revision=branch,
            commit_message=commit_message, repo_type=repo_type, create_pr=create_pr, subfolder=subfolder,
            max_commit_bytes=max_commit_bytes,
        )

    def _check_complete(self) -> None:
        if self.manifest is None:
            raise FileNotFoundError(f"{self.source} has no {MANIFEST_NAME}: the index was not finished")
        if self.store.num_rows != self.dataset_info.get("num_rows", self.store.num_rows):
            raise ValueError(
                f"{self.source} holds {self.store.num_rows} rows of a {self.dataset_info['num_rows']}-row dataset: "
                "finish building it before publishing"
            )

    def attach_dataset(self, dataset: Any, strict: bool = True) -> None:
        """Sets the training dataset that row ids refer to, after checking it is the one the index was built on:
        the recorded size, and the digest of a sample of its rows (:func:`dataset_digest`), so that another dataset
        of the same size, or the same one reordered, is refused; ``strict=False`` only warns about the digest."""
        expected = self.dataset_info.get("num_rows")
        if expected is not None and len(dataset) != expected:
            raise ValueError(f"the index was built on {expected} rows, but the dataset given has {len(dataset)}")
        recorded = self.dataset_info.get("content_digest")
        if recorded is not None:
            columns = [c for c in (self.dataset_info.get("image_column"), self.dataset_info.get("caption_column")) if c]
            missing = [c for c in columns if c not in getattr(dataset, "column_names", columns)]
            found = None if missing else dataset_digest(dataset, columns)
            if found != recorded:
                message = (
                    f"the dataset given is not the one {self.source} was built on: "
                    + (f"it has no column {missing}" if missing else "its rows differ (or are in another order)")
                    + "; result rows would be the wrong images"
                )
                if strict:
                    raise ValueError(message + " (pass strict=False to attach it anyway)")
                warnings.warn(message, stacklevel=2)
        self.dataset = dataset

    @property
    def store(self) -> VectorStore:
        if self._store is None:
            manifest = self.manifest or read_manifest(self.directory)
            if manifest is None:
                raise FileNotFoundError(f"no {MANIFEST_NAME} in {self.source}")
            if int(manifest["row_dim"]) != self.config.row_dim or manifest["dtype"] != self.config.storage_dtype:
                raise ValueError(
                    f"{self.source}: {MANIFEST_NAME} lists rows of {manifest['row_dim']} {manifest['dtype']} values, "
                    f"the config says {self.config.row_dim} {self.config.storage_dtype}"
                )
            for shard in manifest["shards"]:
                check_shard_layout(self.directory, shard, self.config.row_dim, self.config.storage_dtype)
            store = VectorStore(self.directory)
            self._check_row_ids(store.row_ids)
            self._store = store
        return self._store

    def _check_row_ids(self, row_ids: np.ndarray) -> None:
        num_rows = self.dataset_info.get("num_rows")
        if len(np.unique(row_ids)) != len(row_ids):
            raise IndexIntegrityError(f"{self.source}: a dataset row is stored twice in the shards")
        if len(row_ids) and (row_ids.min() < 0 or (num_rows is not None and row_ids.max() >= num_rows)):
            raise IndexIntegrityError(f"{self.source}: the shards hold row ids outside the dataset's {num_rows} rows")

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (the HNSW file not included)."""
        return self.store.nbytes

    @property
    def knn_dim(self) -> int:
        return self.config.knn_dim or self.config.projection_dim

    @property
    def knn(self) -> KnnIndex:
        """The HNSW index: ``knn.bin`` (and its projection), validated and loaded, or, when a file is missing,
        rebuilt from the rows (and saved beside them unless the index is read-only)."""
        if self._knn is None:
            needed = [KNN_NAME] + ([KNN_PROJECTION_NAME] if self.config.knn_projection == "pca" else [])
            missing = [name for name in needed if not (self.directory / name).exists()]
            if not missing:
                self._knn = self._load_knn()
            else:
                logger.warning("%s has no %s: building the HNSW index from the %d stored rows",
                               self.source, " or ".join(missing), self.num_rows)
                self.build_knn()
        return self._knn

    def _load_knn(self) -> KnnIndex:
        records = (self.manifest or {}).get("files", {})
        projection = None
        try:
            for name in KNN_FILES:
                if name in records and (self.directory / name).exists():
                    check_file_digest(self.directory / name, records[name], name)
            if self.config.knn_projection == "pca":
                projection = load_projection(self.directory / KNN_PROJECTION_NAME, self.config.num_timesteps,
                                             self.config.projection_dim, self.knn_dim)
            check_knn_file(self.directory / KNN_NAME, self.config.num_timesteps * self.knn_dim, self.store.row_ids,
                           self.config.hnsw_m, self.config.hnsw_ef_construction)
        except ValueError as error:
            raise IndexIntegrityError(
                f"{error} (in {self.source}; delete {KNN_NAME} and call build_knn() to rebuild the HNSW index)"
            ) from None
        return KnnIndex.load(self.directory / KNN_NAME, self.config.num_timesteps, self.knn_dim, self.num_rows,
                             projection)

    def build_knn(self) -> KnnIndex:
        """(Re)builds the HNSW index from the stored rows: with ``knn_projection="pca"``, the projection is fitted
        first on up to 4,096 rows spread over the index. It is saved as ``knn.bin`` (and
        ``knn_projection.safetensors``) beside them, with checksums in the manifest, unless the index is
        read-only (then see :meth:`save_pretrained`)."""
        projection = None
        if self.config.knn_projection == "pca":
            sample = self.store.get_rows(sample_row_ids(self.store.row_ids))
            sample = sample.reshape(len(sample), self.config.num_timesteps, self.config.projection_dim)
            projection = fit_projection(sample, self.knn_dim, self.config.seed)
        self._knn = KnnIndex.build(
            self.store, self.config.num_timesteps, self.knn_dim, self.config.hnsw_m, self.config.hnsw_ef_construction,
            projection=projection,
        )
        if not self.read_only:
            with index_write_lock(self.directory):
                self._knn.save(self.directory)
                self.record_checksums()
        return self._knn

    def search(self, query: torch.Tensor, top_k: int = 10, exact: bool = False) -> tuple[list[int], list[float]]:
        """The ``top_k`` rows with the largest influence score on a ``(T, K)`` query vector.

        ``exact=True`` scores every stored row; otherwise HNSW proposes candidates (more of them when its
        vectors are folded to ``knn_dim < K``) and they are scored exactly on the stored rows.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        query = query.reshape(-1).to(torch.float32)
        if query.numel() != self.config.row_dim:
            raise ValueError(f"the query has {query.numel()} values, the index rows {self.config.row_dim}")
        if not bool(torch.isfinite(query).all()):
            raise ValueError(
                "the query's DMin vector holds NaN or infinite values (the image or prompt gave a non-finite "
                "gradient); no ranking can be computed from it"
            )
        if exact:
            return exact_top_k(self.store, query, top_k)
        return approximate_top_k(self.knn, self.store, query, top_k, self.config.projection_dim)


    def timestep_scores(self, query: torch.Tensor, row_ids: list[int]) -> np.ndarray:
        """``(len(row_ids), T)``: the stored rows' inner products with a ``(T, K)`` query, timestep by timestep
        (each row's sum is its score)."""
        T, K = self.config.num_timesteps, self.config.projection_dim
        if not row_ids:
            return np.zeros((0, T), dtype=np.float32)
        rows = self.store.get_rows(list(row_ids)).to(torch.float32).reshape(len(row_ids), T, K)
        return torch.einsum("rtk,tk->rt", rows, query.reshape(T, K).to(torch.float32)).numpy()


def describe_dataset(
    dataset: Any, image_column: str, caption_column: str | None, reference: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What an index records about its training dataset. ``reference`` may add where it comes from (``name``,
    ``config_name``, ``revision``, ``split``, ``selection``), so that rows can be found again without the dataset
    object; without it, a dataset loaded from the Hub with ``load_dataset`` is recognised by where ``datasets``
    cached it (repository id, config and commit)."""
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
    """Refuses (``ValueError``) a directory that holds files but no attribution index."""
    if (directory / CONFIG_NAME).exists() or not directory.exists():
        return
    if any(path.name != LOCK_NAME for path in directory.iterdir()):
        raise ValueError(f"{directory} is not empty and is not an attribution index; refusing to write into it")


def prepare_index_directory(directory: str | os.PathLike, config: DMinConfig, dataset_info: dict) -> None:
    """Makes ``directory`` ready for building, or checks that the index already there can be resumed.

    Refuses (``ValueError``) a directory with other files in it, an index built with other settings, or one
    built on another dataset, so a call never overwrites or mixes rows it did not write.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if config_path.exists():
        existing = DMinConfig.from_json_file(config_path)
        differences = existing.differences(config)
        if differences:
            raise ValueError(
                f"{directory} already holds an index built with other settings ({'; '.join(differences)}); "
                "use another output directory or delete it"
            )
        info_path = directory / DATASET_INFO_NAME
        existing_info = json.loads(info_path.read_text()) if info_path.exists() else {}
        for key in ("num_rows", "image_column", "caption_column", "content_digest"):
            if key == "content_digest" and existing_info.get(key) is None:  # recorded since version 0.2
                continue
            if existing_info.get(key) != dataset_info.get(key):
                raise ValueError(
                    f"{directory} already holds an index of another dataset ({key}: "
                    f"{existing_info.get(key)!r} != {dataset_info.get(key)!r}); use another output directory"
                )
        return
    check_not_foreign(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / DATASET_INFO_NAME, dataset_info)
    write_json_atomic(config_path, config.to_dict())

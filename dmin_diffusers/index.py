"""`AttributionIndex`: a resolved config, the stored rows, the HNSW index and a reference to the dataset.

An index is a directory (local, or a snapshot of a Hub repository in the ``huggingface_hub`` cache) holding
``dmin_config.json``, ``dataset.json``, ``manifest.json`` (the sha256 and size of every other file),
``vectors/*.safetensors`` and, optionally, ``knn.bin`` (hnswlib). Only JSON, safetensors and the hnswlib file are
ever read, and the hnswlib file only after :func:`~dmin_diffusers.knn_file.check_knn_file` has validated it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import CommitInfo

from .build_directory import STAGING_NAME, check_not_foreign, index_entries
from .card import IndexSummary, make_index_card
from .config import CONFIG_NAME, DMinConfig, default_knn_dim
from .dataset_rows import HubDatasetRows
from .fingerprints import check_dataset_digest
from .hub import (
    DEFAULT_REPO_TYPE,
    DATASET_INFO_NAME,
    DEFAULT_MAX_COMMIT_BYTES,
    resolve_index_location,
    upload_index,
)
from .artefacts import ARTEFACT_FILES, ARTEFACTS, Artefact
from .locks import LOCK_NAME, index_write_lock, lock_held_elsewhere
from .preconditioner import Preconditioner
from .search import DEFAULT_TOP_K, KnnIndex, approximate_top_k, exact_top_k
from .store import (
    MANIFEST_NAME,
    MAX_SMALL_JSON_BYTES,
    SHARD_DIR,
    IndexIntegrityError,
    PinnedFiles,
    VectorStore,
    changed_error,
    check_file_digest,
    check_shard_layout,
    disk_full_guard,
    manifest_entries,
    open_snapshot,
    read_json_object,
    read_manifest,
    record_files,
    verify_files,
    write_json_atomic,
    write_manifest,
)

logger = logging.getLogger(__name__)
CHECKSUMMED_FILES = (CONFIG_NAME, DATASET_INFO_NAME, *ARTEFACT_FILES)  # listed under "files" in the manifest
METADATA_FILES = (CONFIG_NAME, DATASET_INFO_NAME)  # small: their sha256 is checked every time an index is opened


class AttributionIndex:
    """Compressed training gradients of one dataset for one pipeline, ready to score queries.

    Use :meth:`from_pretrained` to open a saved index (a directory or a Hub repository), :meth:`save_pretrained`
    to copy it elsewhere and :meth:`push_to_hub` to publish it; a pipeline's ``build_attribution_index`` creates
    one and ``load_attribution_index`` attaches one.

    Opening an index checks every file the manifest lists: that it exists and has the listed size, and the sha256
    of the config and the dataset reference (everything the vectors and row ids depend on). The files are pinned
    when the index is opened (:class:`~dmin_diffusers.store.PinnedFiles`): another process replacing them later
    (``save_pretrained(overwrite=True)``, a rebuild) never changes what this object reads, and one opened while a
    writer works waits for it briefly or raises :class:`~dmin_diffusers.store.IndexChangedError`. Only regular
    files are read, each with a bound on its size; an HNSW file the manifest does not list is never loaded. Every row a query
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
        # a directory this process cannot write (a shared, read-only cache) is used without writing anything
        self.read_only = read_only or not _writable(self.directory)
        self._lock = threading.RLock()  # the lazy store and HNSW index, for threads sharing one index
        self._store: VectorStore | None = None
        self._fitted: dict[str, Any] = {}  # artefact name -> its loaded or fitted value (artefacts.py)
        self._unsaved: set[str] = set()  # artefacts fitted in memory and not yet written (a read-only index)
        self._config_unsaved = False  # a refit changed the config in memory only
        self.manifest, self._files = self._open_files(verify)
        try:
            self.config = DMinConfig.from_dict(self._metadata(CONFIG_NAME))
        except TypeError as error:
            raise ValueError(f"{CONFIG_NAME} in {self.source} is not a DMin config ({error})") from None
        has_info = DATASET_INFO_NAME in self._files
        self.dataset_info: dict[str, Any] = self._metadata(DATASET_INFO_NAME) if has_info else {}
        self.dataset: Any = HubDatasetRows(self.dataset_info, token=token)
        if dataset is not None:
            self.attach_dataset(dataset)

    def _open_files(self, verify: bool) -> tuple[dict | None, PinnedFiles]:
        """The manifest and the index's files, pinned as they are now (see
        :func:`~dmin_diffusers.store.open_snapshot`), after checking them against the manifest."""
        manifest, files = open_snapshot(self.directory, extra=(*METADATA_FILES, *ARTEFACT_FILES))
        if CONFIG_NAME not in files:
            raise FileNotFoundError(f"{self.source} is not an attribution index: {CONFIG_NAME} is missing")
        if manifest is not None:
            if "files" in manifest:  # recorded since checksums exist: then every metadata file present is listed
                unlisted = [name for name in METADATA_FILES if name in files and name not in manifest["files"]]
                if unlisted:
                    raise IndexIntegrityError(
                        f"{unlisted[0]} in {self.source} is not listed in {MANIFEST_NAME}: the index was modified"
                    )
            verify_files(self.directory, manifest, full=True if verify else METADATA_FILES,
                         optional=ARTEFACT_FILES, files=files)
        return manifest, files

    def _metadata(self, name: str) -> dict[str, Any]:
        """A small JSON file of the index, read from the pinned file with the size the manifest lists."""
        record = ((self.manifest or {}).get("files") or {}).get(name)
        limit = record["bytes"] if record else MAX_SMALL_JSON_BYTES
        return read_json_object(self._files.path(name), name, self.source, limit)

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
        repo_type: str = DEFAULT_REPO_TYPE,
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
        """The index's files, relative to its directory: metadata, vector shards and, if present, the fitted
        artefacts' files (preconditioner, HNSW index; the per-writer ``vectors/part-*.json`` lists used while
        building are not part of a finished index)."""
        names = [name for name in (CONFIG_NAME, DATASET_INFO_NAME, MANIFEST_NAME) if name in self._files]
        names += [shard["file"] for shard in self.store.shards]
        return names + [name for name in ARTEFACT_FILES if self._listed(name)]

    def _listed(self, name: str) -> bool:
        """Whether ``name`` is present and the manifest vouches for it (an HNSW file it does not list is ignored)."""
        return name in self._files and name in ((self.manifest or {}).get("files") or {})

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
        writing, so a concurrent build or save there fails with a clear error instead of mixing files. The new
        files are written beside the old ones first and moved in with renames, the manifest last: whatever
        interrupts a save, the directory holds the old index or the new one, the next save is never refused, and
        readers that opened the old index keep reading it.

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
        """Writes the index into ``target/.dmin-staging`` (checking every byte copied against the manifest), then
        moves it into ``target`` file by file, the manifest last. A failure while staging leaves ``target`` as it
        was; one while moving (renames only) is finished before the error is raised, so ``target`` holds the old
        index or the new one, and readers that opened the old one keep reading it."""
        if not (target / LOCK_NAME).exists():
            check_not_foreign(target)  # before the lock file is created: a foreign folder is left untouched
        with index_write_lock(target):
            check_not_foreign(target)
            staging = target / STAGING_NAME
            existing = _existing_manifest(target)
            interrupted = existing is None and staging.exists()  # an earlier save that did not finish its move
            if (target / CONFIG_NAME).exists() and existing != self.manifest and not interrupted and not overwrite:
                raise FileExistsError(
                    f"{target} already holds another attribution index; pass overwrite=True to replace it"
                )
            with disk_full_guard(target, f"{target} was left as it was"):
                shutil.rmtree(staging, ignore_errors=True)
                try:
                    manifest = self._stage(staging)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
            try:
                _move_into(staging, target, manifest)
            except BaseException:
                _move_into(staging, target, manifest)  # renames only: finish, so target is never half old
                raise

    def _stage(self, staging: Path) -> dict:
        """Copies the pinned files of the index into ``staging``, with an HNSW index rebuilt in memory, and returns
        the manifest written there (listing every file's checksum)."""
        (staging / SHARD_DIR).mkdir(parents=True)
        records = manifest_entries(self.manifest) if self.manifest else {}
        replaced = {name for artefact in ARTEFACTS if artefact.name in self._unsaved for name in artefact.files}
        if self._config_unsaved:
            replaced.add(CONFIG_NAME)
        for name in self.files():
            if name not in replaced:
                _copy_checked(self._files.path(name), staging / name, records.get(name), name, self.source)
        unsaved = [artefact for artefact in ARTEFACTS if artefact.name not in self._unsaved
                   and artefact.name in self._fitted and not all(map(self._listed, artefact.needed(self.config)))]
        self._unsaved.update(artefact.name for artefact in unsaved)  # fitted in memory when its files were missing
        self._write_fitted(staging)
        return record_files(staging, list(CHECKSUMMED_FILES))

    def record_checksums(self) -> None:
        """Lists the sha256 and size of the config, the dataset reference and the HNSW files in the manifest
        (the shards are listed as they are written)."""
        if self.read_only:
            raise PermissionError(
                f"{self.source} is read-only (a Hub snapshot or a read-only copy); save_pretrained it elsewhere first"
            )
        with disk_full_guard(self.directory, "the index's files are kept"):
            record_files(self.directory, list(CHECKSUMMED_FILES))
        self.manifest, self._files = self._open_files(verify=False)
        with self._lock:
            self._store = None  # opened again on the files just pinned

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        branch: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        repo_type: str = DEFAULT_REPO_TYPE,
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
        if self._unsaved or self._config_unsaved:
            raise ValueError(
                f"{self.source} was refitted in memory (it is read-only): save_pretrained it to a directory and push "
                "that copy"
            )
        if not self.read_only and self._unrecorded():
            self.record_checksums()
        self._check_complete()
        # never publish damage, nor files another process replaced since this index was opened
        verify_files(self.directory, self.manifest, full=True, optional=ARTEFACT_FILES, files=self._files)
        replaced = [name for name in self.files() if not self._files.unchanged(name)]
        if replaced:
            raise changed_error(self.source, f"{replaced[0]} was replaced")
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

    def _unrecorded(self) -> bool:
        """Whether a file beside the shards is present but not listed in the manifest, or listed but gone."""
        listed = set(((self.manifest or {}).get("files") or {}))
        present = {name for name in CHECKSUMMED_FILES if (self.directory / name).is_file()}
        return bool(listed - present)

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
        the recorded size, and the content of every row (:func:`~dmin_diffusers.fingerprints.check_dataset_digest`:
        images by their bytes, not their paths, and captions), so that another dataset, an edited image or the
        same rows in another order is refused; ``strict=False`` only warns about the content."""
        expected = self.dataset_info.get("num_rows")
        if expected is not None and len(dataset) != expected:
            raise ValueError(f"the index was built on {expected} rows, but the dataset given has {len(dataset)}")
        recorded = self.dataset_info.get("content_digest")
        if recorded is not None:
            columns = [c for c in (self.dataset_info.get("image_column"), self.dataset_info.get("caption_column")) if c]
            reason = check_dataset_digest(dataset, columns, recorded)
            if reason is not None:
                message = (
                    f"the dataset given is not the one {self.source} was built on: {reason}; result rows would be "
                    "the wrong images"
                )
                if strict:
                    raise ValueError(message + " (pass strict=False to attach it anyway)")
                warnings.warn(message, stacklevel=2)
        self.dataset = dataset

    @property
    def store(self) -> VectorStore:
        """The stored rows, read from the files pinned when the index was opened."""
        with self._lock:
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def _open_store(self) -> VectorStore:
        manifest = self.manifest
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {self.source}: the index was not finished")
        if int(manifest["row_dim"]) != self.config.row_dim or manifest["dtype"] != self.config.storage_dtype:
            raise ValueError(
                f"{self.source}: {MANIFEST_NAME} lists rows of {manifest['row_dim']} {manifest['dtype']} values, "
                f"the config says {self.config.row_dim} {self.config.storage_dtype}"
            )
        for shard in manifest["shards"]:
            if shard["file"] not in self._files:
                raise IndexIntegrityError(
                    f"{shard['file']} is listed in {MANIFEST_NAME} but missing from {self.source}"
                )
            check_shard_layout(self.directory, shard, self.config.row_dim, self.config.storage_dtype,
                               path=self._files.path(shard["file"]))
        store = VectorStore(self.directory, manifest=manifest, files=self._files,
                            block_size=self.config.projection_dim)
        self._check_row_ids(store.row_ids)
        return store

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
        """HNSW values per timestep: the config's, else the default that resolving a config fills in."""
        return self.config.knn_dim or default_knn_dim(self.config.projection_dim)

    @property
    def preconditioner(self) -> Preconditioner:
        """How queries and rows are compared (``config.preconditioning``): ``preconditioner.safetensors``, validated
        and loaded, or fitted from the stored rows when it is missing (saved beside them unless read-only)."""
        return self._artefact(ARTEFACTS[0])

    @property
    def knn(self) -> KnnIndex:
        """The HNSW index: ``knn.bin`` (and its projection), validated and loaded, or, when a file is missing or
        not listed in the manifest, rebuilt from the rows (and saved beside them unless the index is read-only)."""
        return self._artefact(ARTEFACTS[1])

    def _artefact(self, artefact: Artefact) -> Any:
        with self._lock:
            # the artefacts before it first (the HNSW graph is built in the preconditioner's geometry): refitting a
            # missing one rewrites the manifest and pins the files again, which must not happen under a load
            for earlier in ARTEFACTS[: ARTEFACTS.index(artefact)]:
                self._artefact(earlier)
            if artefact.name not in self._fitted:
                missing = [name for name in artefact.needed(self.config) if not self._listed(name)]
                if not missing:
                    self._fitted[artefact.name] = self._load_artefact(artefact)
                else:
                    logger.warning("%s has no %s listed in its manifest: fitting the %s from the %d stored rows",
                                   self.source, " or ".join(missing), artefact.name, self.num_rows)
                    self._fit((artefact,), save=not self.read_only and not lock_held_elsewhere(self.directory))
            return self._fitted[artefact.name]

    def _load_artefact(self, artefact: Artefact) -> Any:
        records = (self.manifest or {}).get("files") or {}
        paths = {name: self._files.path(name) for name in artefact.needed(self.config)}
        try:
            for name, path in paths.items():
                check_file_digest(path, records[name], name, self.source)
            value = artefact.load(paths, self)
            for name in paths:
                self._files.check(name)
        except ValueError as error:
            if not self._files.unchanged(MANIFEST_NAME):  # rewritten since the index was opened: not damage
                raise changed_error(self.source, f"its {artefact.name} was rebuilt") from None
            raise IndexIntegrityError(
                f"{error} (in {self.source}; delete {' and '.join(paths)} and call refit() to fit the {artefact.name} "
                "again from the stored rows)"
            ) from None
        return value

    def build_knn(self) -> KnnIndex:
        """(Re)builds the HNSW index from the stored rows: with ``knn_projection="pca"``, the projection is fitted
        first on up to 4,096 rows spread over the index. It is saved as ``knn.bin`` (and
        ``knn_projection.safetensors``) beside them, with checksums in the manifest, unless the index is
        read-only (then it stays in memory; see :meth:`save_pretrained`)."""
        self._fit((ARTEFACTS[1],), save=not self.read_only)
        return self._fitted[ARTEFACTS[1].name]

    def refit(self, preconditioning: str | None = None, preconditioning_damping: float | None = None) -> None:
        """Switches the index to another preconditioning (:mod:`~dmin_diffusers.preconditioner`): fits it, and the
        HNSW index in its geometry, from the stored rows, with no gradient computed. The new config and files are
        written beside the rows (the manifest's checksums updated) unless the index is read-only; then they stay
        in memory until :meth:`save_pretrained`. ``None`` keeps a setting; with neither given, the current
        settings are fitted again."""
        changes = {"preconditioning": preconditioning, "preconditioning_damping": preconditioning_damping}
        config = self.config.replace(**{key: value for key, value in changes.items() if value is not None})
        with self._lock:
            state = (self.config, dict(self._fitted), set(self._unsaved), self._config_unsaved)
            self.config = config
            try:
                self._fit(ARTEFACTS, save=not self.read_only, config_changed=config != state[0])
            except BaseException:  # nothing half-fitted stays: the index scores as before
                self.config, self._fitted, self._unsaved, self._config_unsaved = state
                raise

    def _fit(self, artefacts: tuple[Artefact, ...], save: bool, config_changed: bool = False) -> None:
        """Fits ``artefacts`` (in order) from the stored rows and, with ``save``, writes them (and the config, when
        it changed) beside the rows under the write lock, removing files the config no longer needs."""
        with self._lock:
            for artefact in artefacts:
                self._fitted.pop(artefact.name, None)
            for artefact in artefacts:
                self._fitted[artefact.name] = artefact.fit(self)
                self._unsaved.add(artefact.name)
            self._config_unsaved |= config_changed
            if not save:
                return
            with index_write_lock(self.directory), disk_full_guard(self.directory, "the stored rows are kept"):
                if not self._files.unchanged(MANIFEST_NAME):  # another index replaced this one's files: never mix
                    logger.warning("%s was replaced since it was opened: the fitted %s stays in memory",
                                   self.source, " and ".join(a.name for a in artefacts))
                    return
                self._save_fitted()

    def _save_fitted(self) -> None:
        """Writes what was fitted in memory beside the rows as :meth:`save_pretrained` replaces an index: staged
        with a new manifest, then renamed in, the manifest last (readers opening meanwhile wait; those that opened
        the old files keep them). The caller holds the write lock."""
        listed = (self.manifest or {}).get("files") or {}
        if any(name in self._files and name not in listed for name in METADATA_FILES):
            self.record_checksums()  # a build just finished: its config and dataset reference are listed first
        staging = self.directory / STAGING_NAME
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (staging / SHARD_DIR).mkdir(parents=True)
            write_manifest(staging, self.manifest)
            manifest = record_files(staging, self._write_fitted(staging))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            _move_into(staging, self.directory, manifest, prune=False)
        except BaseException:  # renames only: finish, so the index is never half old
            _move_into(staging, self.directory, manifest, prune=False)
            raise
        self.manifest, self._files = self._open_files(verify=False)
        self._store = None  # opened again on the files just pinned
        self._unsaved.clear()
        self._config_unsaved = False

    def _write_fitted(self, directory: Path) -> list[str]:
        """Writes the config (if changed) and the artefacts fitted in memory into ``directory``, removes the
        artefact files the config does not need, and returns the names of the files written or removed."""
        changed = []
        if self._config_unsaved:
            write_json_atomic(directory / CONFIG_NAME, self.config.to_dict())
            changed.append(CONFIG_NAME)
        for artefact in ARTEFACTS:
            if artefact.name in self._unsaved:
                artefact.save(self._fitted[artefact.name], directory)
                changed += artefact.needed(self.config)
            for name in set(artefact.files) - set(artefact.needed(self.config)):
                (directory / name).unlink(missing_ok=True)
                changed.append(name)
        return changed

    def search(self, query: torch.Tensor, top_k: int = DEFAULT_TOP_K, exact: bool = False) -> tuple[list[int], list[float]]:
        """The ``top_k`` rows with the largest influence score on a ``(T, K)`` query vector, in the index's
        preconditioned geometry (``config.preconditioning``).

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
            return exact_top_k(self.store, query, top_k, preconditioner=self.preconditioner)
        return approximate_top_k(self.knn, self.store, query, top_k, self.config.projection_dim)

    def timestep_scores(self, query: torch.Tensor, row_ids: list[int]) -> np.ndarray:
        """``(len(row_ids), T)``: the stored rows' scores for a ``(T, K)`` query, timestep by timestep (each row's
        sum is its score; inner products unless the index is preconditioned)."""
        T, K = self.config.num_timesteps, self.config.projection_dim
        if not row_ids:
            return np.zeros((0, T), dtype=np.float32)
        rows = self.store.get_rows(list(row_ids)).reshape(len(row_ids), T, K)
        return self.preconditioner.timestep_scores(query, rows, list(row_ids)).numpy()


def _existing_manifest(directory: Path) -> dict | str | None:
    """The manifest of the index in ``directory``, ``"damaged"`` when it cannot be read, ``None`` if none."""
    if not (directory / CONFIG_NAME).exists():
        return None
    try:
        return read_manifest(directory)
    except IndexIntegrityError:
        return "damaged"  # another index, as far as overwriting it is concerned


def _writable(directory: Path) -> bool:
    """Whether to write into ``directory``: this process may, and its owner has not removed every write permission
    (``chmod -R a-w`` marks a shared copy read-only, even for root)."""
    try:
        return os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)
    except OSError:
        return False


def _copy_checked(source: str, destination: Path, record: dict | None, name: str, where: str) -> None:
    """Copies a file, checking the bytes copied against the manifest's sha256 and size when it lists them."""
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        for block in iter(lambda: reader.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
            writer.write(block)
        writer.flush()
        os.fsync(writer.fileno())
    if record is not None and (digest.hexdigest() != record["sha256"] or size != record["bytes"]):
        raise IndexIntegrityError(
            f"{name} in {where} does not match its checksum in {MANIFEST_NAME}: the file was modified or damaged; "
            "it was not copied"
        )


def _move_into(staging: Path, target: Path, manifest: dict, prune: bool = True) -> None:
    """Moves a staged index into ``target``: its manifest is removed first (a reader opening meanwhile waits for
    the new one), every other file renamed over the old one, the new manifest renamed last, then, with ``prune``,
    the old index's files that the new one does not list are deleted (a refit keeps the build's per-writer lists,
    which a later run of the same build resumes from). Only renames: it can be called again to finish."""
    listed = set(manifest_entries(manifest))
    if (staging / MANIFEST_NAME).exists():  # not moved yet
        (target / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        (target / MANIFEST_NAME).unlink(missing_ok=True)
        for name in sorted(listed):
            if (staging / name).exists():
                os.replace(staging / name, target / name)
        for name in ARTEFACT_FILES:
            if name not in listed:
                (target / name).unlink(missing_ok=True)
        os.replace(staging / MANIFEST_NAME, target / MANIFEST_NAME)
    ours, _ = index_entries(target) if prune else ([], [])
    for path in ours:
        relative = path.relative_to(target).as_posix()
        if path.parent.name == SHARD_DIR and relative not in listed:
            path.unlink(missing_ok=True)  # the old index's shards, and the per-writer lists of a build
    shutil.rmtree(staging, ignore_errors=True)

"""What an index fits from its stored rows after caching, without a gradient: the preconditioner and the HNSW index.

Each :class:`Artefact` names the files it writes for a config, fits itself from an index's rows (and the
artefacts before it), saves, and loads-and-validates. The index's file list, its checksums, copies, Hub pushes and
the removal of files a config no longer needs all come from :data:`ARTEFACTS`, so another fitted artefact (another
ANN backend) is one class here.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DMinConfig
from .knn_file import check_knn_file
from .knn_projection import KNN_PROJECTION_NAME, fit_projection, load_projection, sample_row_ids
from .preconditioner import PRECONDITIONER_NAME, Preconditioner, rows_digest
from .search import KNN_NAME, KnnIndex

if TYPE_CHECKING:
    from .index import AttributionIndex


class Artefact(ABC):
    """One fitted part of an index, saved beside its rows."""

    name: str
    #: every file this artefact may write
    files: tuple[str, ...]

    @abstractmethod
    def needed(self, config: DMinConfig) -> tuple[str, ...]:
        """The files it writes for ``config`` (none: nothing to save, :meth:`load` builds it from nothing)."""

    @abstractmethod
    def fit(self, index: "AttributionIndex") -> Any:
        """Fits it from the index's stored rows (and the artefacts listed before it)."""

    @abstractmethod
    def save(self, value: Any, directory: str | os.PathLike) -> None:
        """Writes its files into ``directory``, each atomically."""

    @abstractmethod
    def load(self, paths: dict[str, str], index: "AttributionIndex") -> Any:
        """Reads and validates its files (``paths``: file name -> path to read); ``ValueError`` naming a bad file."""


class PreconditionerArtefact(Artefact):
    """``preconditioner.safetensors`` (:mod:`~dmin_diffusers.preconditioner`), absent for ``"none"``."""

    name = "preconditioner"
    files = (PRECONDITIONER_NAME,)

    def needed(self, config: DMinConfig) -> tuple[str, ...]:
        return () if config.preconditioning == "none" else self.files

    def fit(self, index: "AttributionIndex") -> Preconditioner:
        config = index.config
        if config.preconditioning == "none":
            return Preconditioner.identity(config.num_timesteps, config.projection_dim)

        def chunks():
            for row_ids, vectors in index.store.iter_chunks():
                yield row_ids, vectors.reshape(len(vectors), config.num_timesteps, config.projection_dim)

        return Preconditioner.fit(chunks, config.preconditioning, config.preconditioning_damping, seed=config.seed,
                                  rows_digest=rows_digest(index.store.shards))

    def save(self, value: Preconditioner, directory: str | os.PathLike) -> None:
        if not value.is_identity:
            value.save(Path(directory) / PRECONDITIONER_NAME)

    def load(self, paths: dict[str, str], index: "AttributionIndex") -> Preconditioner:
        config = index.config
        if config.preconditioning == "none":
            return Preconditioner.identity(config.num_timesteps, config.projection_dim)
        return Preconditioner.load(
            paths[PRECONDITIONER_NAME], method=config.preconditioning, damping=config.preconditioning_damping,
            num_timesteps=config.num_timesteps, dim=config.projection_dim, rows_digest=rows_digest(index.store.shards),
            row_ids=index.store.row_ids, name=PRECONDITIONER_NAME,
        )


class KnnArtefact(Artefact):
    """The HNSW index, ``knn.bin``, and for ``knn_projection="pca"`` its projection, built in the preconditioner's
    geometry."""

    name = "knn"
    files = (KNN_NAME, KNN_PROJECTION_NAME)

    def needed(self, config: DMinConfig) -> tuple[str, ...]:
        return self.files if config.knn_projection == "pca" else (KNN_NAME,)

    def fit(self, index: "AttributionIndex") -> KnnIndex:
        config, preconditioner = index.config, index.preconditioner
        projection = None
        if config.knn_projection == "pca":
            ids = sample_row_ids(index.store.row_ids)
            shaped = index.store.get_rows(ids).reshape(len(ids), config.num_timesteps, config.projection_dim)
            if not preconditioner.is_identity:
                shaped = preconditioner.map_rows(shaped, ids)
            projection = fit_projection(shaped, index.knn_dim, config.seed)
        return KnnIndex.build(index.store, config.num_timesteps, index.knn_dim, config.hnsw_m,
                              config.hnsw_ef_construction, projection=projection, preconditioner=preconditioner)

    def save(self, value: KnnIndex, directory: str | os.PathLike) -> None:
        value.save(directory)

    def load(self, paths: dict[str, str], index: "AttributionIndex") -> KnnIndex:
        config = index.config
        projection = None
        if config.knn_projection == "pca":
            projection = load_projection(paths[KNN_PROJECTION_NAME], config.num_timesteps, config.projection_dim,
                                         index.knn_dim)
        check_knn_file(paths[KNN_NAME], config.num_timesteps * index.knn_dim, index.store.row_ids, config.hnsw_m,
                       config.hnsw_ef_construction, name=KNN_NAME)
        return KnnIndex.load(paths[KNN_NAME], config.num_timesteps, index.knn_dim, index.num_rows, projection,
                             index.preconditioner)


#: in fitting order: each may use those before it
ARTEFACTS: tuple[Artefact, ...] = (PreconditionerArtefact(), KnnArtefact())
ARTEFACT_FILES: tuple[str, ...] = tuple(name for artefact in ARTEFACTS for name in artefact.files)

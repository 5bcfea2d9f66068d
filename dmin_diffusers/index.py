"""`AttributionIndex`: a resolved config, the stored rows, the HNSW index and a reference to the dataset."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME, DMinConfig
from .search import KnnIndex, exact_top_k
from .store import MANIFEST_NAME, SHARD_DIR, VectorStore, write_json_atomic

KNN_NAME = "knn.bin"
DATASET_INFO_NAME = "dataset.json"


class AttributionIndex:
    """Compressed training gradients of one dataset for one pipeline, ready to score queries.

    Use :meth:`from_pretrained` to open a saved index and :meth:`save_pretrained` to copy it elsewhere; a
    pipeline's ``build_attribution_index`` creates one and ``load_attribution_index`` attaches one.

    Args:
        directory: where the index files live.
        dataset: the training ``datasets.Dataset``, optional; lets results return the training rows.
    """

    def __init__(self, directory: str | os.PathLike, dataset: Any = None):
        self.directory = Path(directory)
        config_path = self.directory / CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(f"{self.directory} is not an attribution index: {CONFIG_NAME} is missing")
        self.config = DMinConfig.from_json_file(config_path)
        info_path = self.directory / DATASET_INFO_NAME
        self.dataset_info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.exists() else {}
        self.dataset = None
        if dataset is not None:
            self.attach_dataset(dataset)
        self._store: VectorStore | None = None
        self._knn: KnnIndex | None = None

    @classmethod
    def from_pretrained(cls, pretrained_index_path: str | os.PathLike, dataset: Any = None) -> "AttributionIndex":
        """Opens the index saved in a local directory."""
        return cls(pretrained_index_path, dataset=dataset)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Copies the index files (config, manifest, shards, HNSW file, dataset reference) to a directory."""
        target = Path(save_directory)
        if target.resolve() == self.directory.resolve():
            return
        (target / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        for shard in self.store.shards:
            shutil.copyfile(self.directory / shard["file"], target / shard["file"])
        for name in (CONFIG_NAME, DATASET_INFO_NAME, KNN_NAME, MANIFEST_NAME):
            if (self.directory / name).exists():
                shutil.copyfile(self.directory / name, target / name)

    def attach_dataset(self, dataset: Any) -> None:
        """Sets the training dataset that row ids refer to, after checking it has the recorded size."""
        expected = self.dataset_info.get("num_rows")
        if expected is not None and len(dataset) != expected:
            raise ValueError(f"the index was built on {expected} rows, but the dataset given has {len(dataset)}")
        self.dataset = dataset

    @property
    def store(self) -> VectorStore:
        if self._store is None:
            self._store = VectorStore(self.directory)
            if self._store.row_dim != self.config.row_dim:
                raise ValueError(
                    f"{self.directory}: stored rows have {self._store.row_dim} values, the config says "
                    f"{self.config.row_dim}"
                )
        return self._store

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
        """The HNSW index, loaded from disk, or built and saved if it is missing."""
        if self._knn is None:
            path = self.directory / KNN_NAME
            if path.exists():
                self._knn = KnnIndex.load(path, self.config.num_timesteps, self.knn_dim, self.num_rows)
            else:
                self.build_knn()
        return self._knn

    def build_knn(self) -> None:
        """(Re)builds the HNSW index from the stored rows and saves it beside them."""
        self._knn = KnnIndex.build(
            self.store, self.config.num_timesteps, self.knn_dim, self.config.hnsw_m, self.config.hnsw_ef_construction
        )
        self._knn.save(self.directory / KNN_NAME)

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
        if exact:
            return exact_top_k(self.store, query, top_k)
        oversample = 1 if self.knn_dim == self.config.projection_dim else 4
        candidates = self.knn.candidates(query, top_k * oversample)
        scores = self.store.get_rows(candidates) @ query
        order = torch.argsort(scores, descending=True, stable=True)[:top_k]
        return [candidates[i] for i in order.tolist()], scores[order].tolist()


def describe_dataset(
    dataset: Any, image_column: str, caption_column: str | None, reference: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What an index records about its training dataset. ``reference`` may add where it comes from (``name``,
    ``config_name``, ``revision``, ``split``), so that rows can be found again without the dataset object."""
    info = getattr(dataset, "info", None)
    described = {
        "num_rows": len(dataset),
        "image_column": image_column,
        "caption_column": caption_column,
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "name": getattr(info, "dataset_name", None),
        "config_name": getattr(info, "config_name", None),
        "revision": None,
        "split": str(dataset.split) if getattr(dataset, "split", None) is not None else None,
    }
    described.update(reference or {})
    return described


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
        for key in ("num_rows", "image_column", "caption_column"):
            if existing_info.get(key) != dataset_info.get(key):
                raise ValueError(
                    f"{directory} already holds an index of another dataset ({key}: "
                    f"{existing_info.get(key)!r} != {dataset_info.get(key)!r}); use another output directory"
                )
        return
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} is not empty and is not an attribution index; refusing to write into it")
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / DATASET_INFO_NAME, dataset_info)
    write_json_atomic(config_path, config.to_dict())

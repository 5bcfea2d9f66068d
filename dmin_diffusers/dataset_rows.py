"""The training rows an index refers to, found again on the Hub by dataset name, revision, split and row index.

An index records where its dataset came from (``dataset.json``). When no ``datasets.Dataset`` is attached,
:class:`HubDatasetRows` stands in for it: it loads the split with ``datasets.load_dataset`` the first time a row is
asked for, re-applies a recorded row selection, checks the row count, and otherwise says why it cannot.
"""

from __future__ import annotations

import re
from typing import Any

# datasets' cache layout for Hub datasets: <cache>/<namespace>___<name>/<config>/<version>/<commit sha>/<file>
_HUB_CACHE_PATH = re.compile(r"(?:^|/)([^/]+)___([^/]+)/([^/]+)/[^/]+/([0-9a-f]{40})/[^/]+$")
_SELECTION = re.compile(r"^shuffle\(seed=(\d+)\)\.select\(range\((\d+)\)\)$")
# builders of local files: their name is not a dataset on the Hub
_LOCAL_BUILDERS = {"arrow", "audiofolder", "csv", "generator", "imagefolder", "json", "pandas", "parquet", "sql",
                   "text", "videofolder", "webdataset", "xml"}


def infer_hub_reference(dataset: Any) -> dict[str, Any]:
    """``name``, ``config_name`` and ``revision`` (the commit) of a dataset loaded from the Hub with
    ``datasets.load_dataset``, read from where ``datasets`` cached it; ``{}`` for other datasets."""
    for cache_file in getattr(dataset, "cache_files", None) or []:
        match = _HUB_CACHE_PATH.search(str(cache_file.get("filename", "")).replace("\\", "/"))
        if match:
            namespace, name, config_name, revision = match.groups()
            return {"name": f"{namespace}/{name}", "config_name": config_name, "revision": revision}
    return {}


class HubDatasetRows:
    """Rows of the training dataset recorded in an index, loaded lazily from the Hub.

    Indexing (``rows[i]``) returns the ``i``-th training row as a dict, as a ``datasets.Dataset`` would; it raises
    ``LookupError`` when the dataset cannot be loaded, and :attr:`unavailable_reason` then says why.

    Args:
        info: the index's ``dataset.json`` (``name``, ``config_name``, ``revision``, ``split``, ``num_rows`` and
            optionally ``selection`` and ``data_dir``).
        token: token for a private dataset (by default the one ``huggingface_hub`` finds).
    """

    def __init__(self, info: dict[str, Any], token: str | bool | None = None):
        self.info = dict(info)
        self.token = token
        self._dataset = None
        self._reason: str | None = None
        self._tried = False

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={self.info.get(key)!r}" for key in ("name", "revision", "split", "num_rows"))
        return f"HubDatasetRows({fields})"

    def __len__(self) -> int:
        return int(self.info.get("num_rows") or 0)

    def __getitem__(self, row: int) -> dict[str, Any]:
        dataset = self.load()
        if dataset is None:
            raise LookupError(self._reason)
        return dataset[int(row)]

    @property
    def unavailable_reason(self) -> str | None:
        """Why the rows cannot be loaded (tries loading them first); ``None`` once they are loaded."""
        self.load()
        return self._reason

    def load(self):
        """The training rows as a ``datasets.Dataset`` (loaded once, from the ``datasets`` cache when there), or
        ``None`` when they cannot be loaded."""
        if not self._tried:
            self._tried = True
            self._reason = self._why_not_loadable()
            if self._reason is None:
                try:
                    self._dataset = self._load()
                except Exception as error:  # any failure of the Hub or of datasets: explain, don't crash
                    self._reason = f"could not load {self._describe()}: {type(error).__name__}: {error}"
        return self._dataset

    def _describe(self) -> str:
        info = self.info
        parts = [f"revision {info.get('revision') or 'main (not pinned)'}", f"split {info.get('split') or 'train'}"]
        if info.get("config_name"):
            parts.insert(0, f"config {info['config_name']}")
        return f"the training dataset {info.get('name')!r} ({', '.join(parts)}) from the Hub"

    def _why_not_loadable(self) -> str | None:
        name = self.info.get("name")
        if not name or name in _LOCAL_BUILDERS:
            return (
                "the index was built on a dataset that is not on the Hub (dataset.json records no dataset name); "
                "pass dataset=... to load_attribution_index or AttributionIndex.from_pretrained"
            )
        selection = self.info.get("selection")
        if selection and not _SELECTION.match(str(selection)):
            return f"the index's rows are a selection ({selection}) of {name!r} that cannot be reproduced here"
        return None

    def _load(self):
        import datasets

        info = self.info
        dataset = datasets.load_dataset(
            info["name"],
            info.get("config_name"),
            data_dir=info.get("data_dir"),
            revision=info.get("revision"),
            split=info.get("split") or "train",
            token=self.token,
        )
        selection = _SELECTION.match(str(info.get("selection") or ""))
        if selection:
            seed, count = (int(group) for group in selection.groups())
            dataset = dataset.shuffle(seed=seed).select(range(min(count, len(dataset))))
        expected = info.get("num_rows")
        if expected is not None and len(dataset) != expected:
            self._reason = (
                f"{self._describe()} has {len(dataset)} rows, but the index was built on {expected}; "
                "pass the training dataset as dataset=..."
            )
            return None
        return dataset

"""Moving attribution indices to and from the Hugging Face Hub with ``huggingface_hub``.

Downloads come in two steps: the small metadata files first (config, dataset reference, manifest, card), then
exactly the shards the manifest lists and the HNSW file, in parallel, from the same commit. Uploads send the
vector shards in commits of at most ``max_commit_bytes`` (so a large push can be resumed: unchanged files are
skipped), and the metadata, the HNSW file and the card last, in one commit: until then the repository still
holds the previous, consistent index, because a shard's name holds a digest of its content (a new shard never
overwrites one the previous index lists; shards with older, positional names all go in the last commit). Files
of an older index that the new one no longer lists are deleted in that last commit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    DatasetCard,
    HfApi,
    RepoFile,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.utils import validate_hf_hub_args

from ._version import __version__
from .config import CONFIG_NAME
from .search import KNN_FILES
from .store import MANIFEST_NAME, SHARD_DIR, manifest_entries, read_manifest

logger = logging.getLogger(__name__)

LIBRARY_NAME = "dmin-diffusers"
DATASET_INFO_NAME = "dataset.json"
CARD_NAME = "README.md"
METADATA_FILES = (CONFIG_NAME, DATASET_INFO_NAME, MANIFEST_NAME)
DEFAULT_MAX_COMMIT_BYTES = 1 << 30
#: the kind of Hub repository indices go to unless told otherwise (they hold data, not a model)
DEFAULT_REPO_TYPE = "dataset"
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_CARD_TAG = "dmin"


@dataclass
class IndexLocation:
    """Where an index's files are on this machine, and where they came from."""

    directory: Path
    source: str
    from_hub: bool = False
    commit: str | None = None


def _prefixed(subfolder: str | None, name: str) -> str:
    return f"{subfolder.strip('/')}/{name}" if subfolder else name


def resolve_index_location(
    pretrained_index_name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    repo_type: str = DEFAULT_REPO_TYPE,
    subfolder: str | None = None,
    force_download: bool = False,
    metadata_only: bool = False,
) -> IndexLocation:
    """A local directory as it is, or a Hub repository id downloaded (see :func:`download_index`)."""
    path = Path(pretrained_index_name_or_path)
    if path.is_dir():
        directory = path / subfolder if subfolder else path
        return IndexLocation(directory=directory, source=str(directory))
    name = str(pretrained_index_name_or_path)
    looks_local = name.count("/") > 1 or name.startswith((".", "/", "~"))
    if isinstance(pretrained_index_name_or_path, os.PathLike) or looks_local:
        raise FileNotFoundError(f"{name} is not a directory (and not a Hub repository id)")
    try:
        return download_index(
            name, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
            repo_type=repo_type, subfolder=subfolder, force_download=force_download, metadata_only=metadata_only,
        )
    except (OSError, ValueError) as error:
        if "/" in name:  # "user/name": a repository id, whose errors (not found, no such revision...) speak for it
            raise
        raise FileNotFoundError(
            f"{name!r} is not a local directory, and not an attribution index on the Hub either "
            f"({type(error).__name__}: {error})"
        ) from error


@validate_hf_hub_args
def download_index(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    repo_type: str = DEFAULT_REPO_TYPE,
    subfolder: str | None = None,
    force_download: bool = False,
    metadata_only: bool = False,
) -> IndexLocation:
    """Downloads an index from the Hub into the ``huggingface_hub`` cache (or finds it there) and returns the
    snapshot directory. ``metadata_only`` stops after the small files (config, dataset reference, manifest,
    card), e.g. to check that an index fits a pipeline before downloading its vectors."""
    common = dict(
        repo_type=repo_type, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
        library_name=LIBRARY_NAME, library_version=__version__,
    )
    metadata = [_prefixed(subfolder, name) for name in (*METADATA_FILES, CARD_NAME)]
    snapshot = Path(
        snapshot_download(repo_id, revision=revision, allow_patterns=metadata, force_download=force_download, **common)
    )
    commit = snapshot.name if _COMMIT_SHA.match(snapshot.name) else revision
    directory = snapshot / subfolder if subfolder else snapshot
    where = f"{repo_id}@{commit or revision or constants.DEFAULT_REVISION}" + (f"/{subfolder}" if subfolder else "")
    missing = [name for name in (CONFIG_NAME, MANIFEST_NAME) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{where} is not an attribution index: {', '.join(missing)} not found there")
    location = IndexLocation(directory=directory, source=where, from_hub=True, commit=commit)
    if metadata_only:
        return location
    manifest = read_manifest(directory)
    data = [_prefixed(subfolder, name) for name in manifest_entries(manifest) if name not in METADATA_FILES]
    data += [_prefixed(subfolder, name) for name in KNN_FILES]  # optional: the HNSW files are rebuilt from the rows
    snapshot_download(repo_id, revision=commit or revision, allow_patterns=sorted(set(data)),
                      force_download=force_download, max_workers=8, **common)
    return location


def _commit_batches(directory: Path, files: list[str], max_commit_bytes: int) -> list[list[str]]:
    batches: list[list[str]] = []
    size = 0
    for name in files:
        file_size = (directory / name).stat().st_size
        if not batches or (size + file_size > max_commit_bytes and batches[-1]):
            batches.append([])
            size = 0
        batches[-1].append(name)
        size += file_size
    return batches


def _same_file(remote: RepoFile | None, path: Path, record: dict | None) -> bool:
    """Whether the repository already holds this file: same LFS sha256 as the manifest lists or, for files
    stored in git, same git blob id (what ``huggingface_hub`` itself compares before skipping a file)."""
    if remote is None or remote.size != path.stat().st_size:
        return False
    if remote.lfs is not None and record is not None:
        return remote.lfs.sha256 == record["sha256"]
    digest = hashlib.sha1(f"blob {remote.size}\0".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == remote.blob_id


def _is_index_file(name: str) -> bool:
    return name in (*METADATA_FILES, *KNN_FILES) or (name.startswith(f"{SHARD_DIR}/") and name.endswith(".safetensors"))


def _keep_remote_card(api: HfApi, repo_id: str, path: str, repo_type: str, revision: str | None) -> bool:
    """True when the repository already has a card at ``path`` that was not written by dmin-diffusers."""
    local = hf_hub_download(repo_id, path, repo_type=repo_type, revision=revision, token=api.token)
    try:
        tags = DatasetCard.load(local).data.to_dict().get("tags") or []
    except Exception:  # a card whose metadata does not parse is certainly not ours: leave it alone
        return True
    return _CARD_TAG not in tags


@validate_hf_hub_args
def upload_index(
    directory: str | os.PathLike,
    repo_id: str,
    files: list[str],
    card: DatasetCard,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    repo_type: str = DEFAULT_REPO_TYPE,
    create_pr: bool = False,
    subfolder: str | None = None,
    max_commit_bytes: int = DEFAULT_MAX_COMMIT_BYTES,
) -> CommitInfo:
    """Uploads the index ``files`` (paths relative to ``directory``) and its card to ``repo_id``, creating the
    repository (and the ``revision`` branch) if needed. Returns the :class:`~huggingface_hub.CommitInfo` of the
    last commit, the one that makes the new index visible (with ``create_pr``, the single commit of the PR)."""
    directory = Path(directory)
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True).repo_id
    if revision not in (None, constants.DEFAULT_REVISION) and not create_pr:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    remote = {
        entry.path: entry
        for entry in api.list_repo_tree(repo_id, recursive=True, repo_type=repo_type, revision=revision)
        if isinstance(entry, RepoFile)
    }
    target = _Target(api, repo_id, repo_type, revision, subfolder)
    message = commit_message or "Upload DMin attribution index"
    shards = [name for name in files if name.startswith(f"{SHARD_DIR}/")]
    shard_bytes = sum((directory / name).stat().st_size for name in shards)
    if create_pr or shard_bytes <= max_commit_bytes:
        last = files
    else:
        last = _push_changed_shards(target, directory, files, shards, remote, message, max_commit_bytes)
    operations = [CommitOperationAdd(target.path(name), directory / name) for name in last]
    operations += _card_operations(target, card, remote)
    operations += [CommitOperationDelete(path) for path in _stale_files(remote, files, subfolder)]
    return api.create_commit(
        repo_id, operations, commit_message=message, repo_type=repo_type, revision=revision, create_pr=create_pr
    )


@dataclass
class _Target:
    """Where an upload goes: a repository, its kind and branch, and the folder in it."""

    api: HfApi
    repo_id: str
    repo_type: str
    revision: str | None
    subfolder: str | None

    def path(self, name: str) -> str:
        return _prefixed(self.subfolder, name)


def _stale_files(remote: dict[str, RepoFile], files: list[str], subfolder: str | None) -> list[str]:
    """The index files in the repository's folder that the new index no longer lists."""
    prefix = _prefixed(subfolder, "")
    return sorted(
        path for path in remote
        if path.startswith(prefix) and _is_index_file(path[len(prefix):]) and path[len(prefix):] not in files
    )


def _push_changed_shards(target: _Target, directory: Path, files: list[str], shards: list[str],
                         remote: dict[str, RepoFile], message: str, max_commit_bytes: int) -> list[str]:
    """Commits the shards the repository does not hold yet (an earlier or interrupted push may have sent some), in
    batches of at most ``max_commit_bytes``; returns the files left for the last commit."""
    records = manifest_entries(read_manifest(directory) or {"shards": []})
    changed = [
        name for name in shards if not _same_file(remote.get(target.path(name)), directory / name, records.get(name))
    ]
    # shard names hold a digest of their content, so a new shard never overwrites a file of the index the
    # repository holds now; shards of an older store (positional names) may: they all go in the last commit
    overwrites = [name for name in changed if target.path(name) in remote]
    if overwrites:
        logger.info("%s would replace %s of the index in %s: pushing everything in one commit",
                    directory, overwrites[0], target.repo_id)
        return files
    batches = _commit_batches(directory, changed, max_commit_bytes) if changed else []
    for number, batch in enumerate(batches, start=1):
        target.api.create_commit(
            target.repo_id, [CommitOperationAdd(target.path(name), directory / name) for name in batch],
            commit_message=f"{message} (vectors, part {number} of {len(batches)})",
            repo_type=target.repo_type, revision=target.revision,
        )
        logger.info("pushed vector shards part %d of %d to %s", number, len(batches), target.repo_id)
    return [name for name in files if name not in shards]


def _card_operations(target: _Target, card: DatasetCard, remote: dict[str, RepoFile]) -> list[CommitOperationAdd]:
    """The card's upload, unless the repository holds a card that dmin-diffusers did not write."""
    card_path = target.path(CARD_NAME)
    if card_path in remote and _keep_remote_card(target.api, target.repo_id, card_path, target.repo_type,
                                                 target.revision):
        logger.warning("%s in %s was not written by dmin-diffusers: keeping it (the generated card is not pushed)",
                       card_path, target.repo_id)
        return []
    return [CommitOperationAdd(card_path, str(card).encode("utf-8"))]

"""Checks of the fake Hub in hub_server.py, through huggingface_hub's public API only."""

import json
import os
import random
from pathlib import Path

import pytest
from huggingface_hub import (
    HfApi,
    constants,
    create_branch,
    create_repo,
    delete_file,
    get_session,
    hf_hub_download,
    list_repo_files,
    repo_info,
    snapshot_download,
    upload_file,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


REPO = "user/attribution-index"


def _make_folder(root: Path) -> dict[str, bytes]:
    """A folder shaped like an attribution index: JSON, a ~3 MB binary, nested subfolders."""
    rng = random.Random(0)
    files = {
        "config.json": json.dumps({"timesteps": [100, 500, 900], "k": 4096}, indent=2).encode(),
        "index/hnsw.bin": rng.randbytes(3 * 1024 * 1024 + 17),
        "index/shards/shard-00000.safetensors": rng.randbytes(4096),
        "index/shards/meta/manifest.json": b'{"shards": 1}',
        "empty.txt": b"",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _read(path) -> bytes:
    return Path(path).read_bytes()


def test_fixture_points_huggingface_hub_at_local_server(local_hub, tmp_path):
    assert local_hub.endpoint.startswith("http://127.0.0.1:")
    assert constants.ENDPOINT == local_hub.endpoint
    assert os.environ["HF_ENDPOINT"] == local_hub.endpoint
    assert constants.HF_HUB_CACHE.startswith(local_hub.hf_home)
    assert constants.HF_HUB_DISABLE_XET and not constants.HF_HUB_OFFLINE
    assert HfApi().whoami()["name"] == local_hub.username


def test_upload_folder_snapshot_and_cache(local_hub, tmp_path):
    files = _make_folder(tmp_path / "folder")
    url = create_repo(REPO, repo_type="dataset", private=True)
    assert url.repo_id == REPO and url.repo_type == "dataset"
    # exist_ok tolerates the 409 answered for an existing repo.
    assert create_repo(REPO, repo_type="dataset", private=True, exist_ok=True).repo_id == REPO

    commit = upload_folder(repo_id=REPO, repo_type="dataset", folder_path=tmp_path / "folder")
    assert len(commit.oid) == 40

    info = repo_info(REPO, repo_type="dataset")
    assert info.private is True and info.sha == commit.oid and info.id == REPO
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["index/hnsw.bin"] == len(files["index/hnsw.bin"])
    # As on the Hub, a new repo already holds a .gitattributes file.
    assert sorted(list_repo_files(REPO, repo_type="dataset")) == sorted([".gitattributes", *files])

    # Fresh cache: byte-identical files.
    cache = local_hub.new_cache_dir()
    snapshot = Path(snapshot_download(REPO, repo_type="dataset", cache_dir=cache))
    assert snapshot.name == commit.oid
    for rel, data in files.items():
        assert _read(snapshot / rel) == data, rel

    # Single file into the default (per-test) cache.
    path = hf_hub_download(REPO, "index/hnsw.bin", repo_type="dataset")
    assert path.startswith(local_hub.hf_home)
    assert _read(path) == files["index/hnsw.bin"]

    # From cache, without a single request.
    local_hub.clear_requests()
    again = hf_hub_download(REPO, "index/hnsw.bin", repo_type="dataset", local_files_only=True)
    assert again == path
    offline = snapshot_download(REPO, repo_type="dataset", cache_dir=cache, local_files_only=True)
    assert Path(offline) == snapshot
    assert local_hub.requests == []
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "config.json", repo_type="dataset", local_files_only=True)

    # Uploading the same folder again is a no-op: preupload reports the remote blob ids.
    again_commit = upload_folder(repo_id=REPO, repo_type="dataset", folder_path=tmp_path / "folder")
    assert again_commit.oid == commit.oid


def test_revisions_branches_and_deletes(local_hub, tmp_path):
    api = HfApi()
    api.create_repo(REPO, repo_type="dataset")
    first = upload_file(path_or_fileobj=b'{"v": 1}', path_in_repo="config.json", repo_id=REPO, repo_type="dataset")
    second = upload_file(path_or_fileobj=b'{"v": 2}', path_in_repo="config.json", repo_id=REPO, repo_type="dataset")
    assert first.oid != second.oid

    cache = local_hub.new_cache_dir()
    old = hf_hub_download(REPO, "config.json", repo_type="dataset", revision=first.oid, cache_dir=cache)
    new = hf_hub_download(REPO, "config.json", repo_type="dataset", revision="main", cache_dir=cache)
    assert _read(old) == b'{"v": 1}' and _read(new) == b'{"v": 2}'
    assert _read(hf_hub_download(REPO, "config.json", repo_type="dataset", revision=first.oid[:10])) == b'{"v": 1}'
    snap = snapshot_download(REPO, repo_type="dataset", revision=first.oid, cache_dir=local_hub.new_cache_dir())
    assert _read(Path(snap) / "config.json") == b'{"v": 1}'
    assert repo_info(REPO, repo_type="dataset", revision=first.oid).sha == first.oid

    # A branch from the first commit, then a commit on it; main does not move.
    create_branch(REPO, repo_type="dataset", branch="dev", revision=first.oid)
    create_branch(REPO, repo_type="dataset", branch="dev", exist_ok=True)
    on_dev = upload_file(
        path_or_fileobj=b"dev only", path_in_repo="sub/dev.txt", repo_id=REPO, repo_type="dataset", revision="dev"
    )
    assert repo_info(REPO, repo_type="dataset", revision="dev").sha == on_dev.oid
    assert repo_info(REPO, repo_type="dataset").sha == second.oid
    assert sorted(list_repo_files(REPO, repo_type="dataset", revision="dev")) == [
        ".gitattributes", "config.json", "sub/dev.txt"
    ]
    assert "sub/dev.txt" not in list_repo_files(REPO, repo_type="dataset")
    dev_config = hf_hub_download(REPO, "config.json", repo_type="dataset", revision="dev", cache_dir=cache)
    assert _read(dev_config) == b'{"v": 1}'
    refs = api.list_repo_refs(REPO, repo_type="dataset")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second.oid, "dev": on_dev.oid}

    # Committing to a branch that does not exist fails, as on the Hub.
    with pytest.raises(RevisionNotFoundError):
        upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, repo_type="dataset", revision="nope")

    # delete_file makes a new commit; the old commit still serves the file.
    deleted = delete_file("config.json", repo_id=REPO, repo_type="dataset")
    assert list_repo_files(REPO, repo_type="dataset") == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "config.json", repo_type="dataset", revision=deleted.oid, cache_dir=cache)
    assert _read(hf_hub_download(REPO, "config.json", repo_type="dataset", revision=second.oid)) == b'{"v": 2}'
    with pytest.raises(EntryNotFoundError):
        delete_file("config.json", repo_id=REPO, repo_type="dataset")


def test_not_found_errors(local_hub):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        repo_info("user/missing", repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "config.json", repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("user/missing", repo_type="dataset")

    api.create_repo("user/model-repo", private=True)  # model repo: resolve URLs without a type prefix
    upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="user/model-repo")
    assert _read(hf_hub_download("user/model-repo", "config.json")) == b"{}"
    with pytest.raises(RepositoryNotFoundError):  # wrong repo type
        hf_hub_download("user/model-repo", "config.json", repo_type="dataset")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/model-repo", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/model-repo", "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("user/model-repo", revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        repo_info("user/model-repo", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        create_branch("user/model-repo", branch="b", revision="no-such-branch")
    assert not api.file_exists("user/model-repo", "missing.json")
    assert api.file_exists("user/model-repo", "config.json")

    # A private repo read without a token looks missing, as on the Hub.
    with pytest.raises(RepositoryNotFoundError):
        repo_info("user/model-repo", token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/model-repo", "config.json", token=False, cache_dir=local_hub.new_cache_dir())


def test_tree_pagination_spaces_and_ranges(local_hub):
    local_hub.tree_page_size = 2  # force several pages of the tree API
    api = HfApi()
    api.create_repo("user/space", repo_type="space", space_sdk="static")
    payload = bytes(range(256)) * 4
    api.upload_file(path_or_fileobj=payload, path_in_repo="a/b/data.bin", repo_id="user/space", repo_type="space")
    for i in range(4):
        api.upload_file(path_or_fileobj=str(i).encode(), path_in_repo=f"a/f{i}.txt", repo_id="user/space",
                        repo_type="space")
    files = api.list_repo_files("user/space", repo_type="space")
    assert sorted(files) == [".gitattributes", "a/b/data.bin", "a/f0.txt", "a/f1.txt", "a/f2.txt", "a/f3.txt"]
    top = [e.path for e in api.list_repo_tree("user/space", path_in_repo="a", repo_type="space")]
    assert top == ["a/b", "a/f0.txt", "a/f1.txt", "a/f2.txt", "a/f3.txt"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("user/space", path_in_repo="nope", repo_type="space"))
    assert api.space_info("user/space").sdk == "static"

    snap = snapshot_download("user/space", repo_type="space", cache_dir=local_hub.new_cache_dir())
    assert _read(Path(snap) / "a" / "b" / "data.bin") == payload

    # Range requests on resolve URLs (what the downloader sends when resuming).
    url = f"{local_hub.endpoint}/spaces/user/space/resolve/main/a/b/data.bin"
    auth = {"authorization": "Bearer hf_local_test_token"}
    head = get_session().head(url, headers=auth)
    assert head.headers["ETag"].strip('"') == head.headers["ETag"][1:-1] and head.headers["ETag"].startswith('"')
    assert int(head.headers["Content-Length"]) == len(payload) and len(head.headers["X-Repo-Commit"]) == 40
    part = get_session().get(url, headers={**auth, "Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == payload[1000:]
    assert part.headers["Content-Range"] == f"bytes 1000-{len(payload) - 1}/{len(payload)}"
    assert get_session().get(url, headers={**auth, "Range": "bytes=-5"}).content == payload[-5:]
    assert get_session().get(url, headers={**auth, "Range": "bytes=5000-"}).status_code == 416
    missing = get_session().head(url.replace("data.bin", "nope.bin"), headers=auth)
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    assert missing.content == b""

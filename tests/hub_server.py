"""A small, standard-library-only fake of the Hugging Face Hub for offline tests.

`LocalHub` serves the subset of the Hub HTTP API that ``huggingface_hub`` (checked against 2.4) uses for
``create_repo``, ``upload_folder``, ``upload_file``, ``create_commit``, ``delete_file``, ``create_branch``,
``create_tag``, ``repo_info`` / ``dataset_info`` / ``model_info``, ``list_repo_files``, ``list_repo_tree``,
``list_repo_refs``, ``list_repo_commits``, ``get_paths_info``, ``file_exists``, ``repo_exists``,
``hf_hub_download`` and ``snapshot_download``.  It listens on 127.0.0.1 with an OS-assigned port, keeps blobs
in a temporary directory and history in memory, and behaves like the Hub where tests can notice:

* every commit gets a fresh 40-hex commit sha; branches (``main`` from creation, others from ``create_branch``),
  tags and ``refs/pr/N`` point at commits; files can be read at a branch, tag, PR ref or (short) commit sha;
* a new repo starts with one commit holding a ``.gitattributes`` file, as on the Hub (``initial_gitattributes=
  False`` gives an empty initial commit instead), so ``list_repo_files`` / snapshots contain ``.gitattributes``;
* committing to a branch that does not exist fails with ``RevisionNotFoundError`` (call ``create_branch`` first,
  exactly as against the real Hub);
* preupload always answers ``uploadMode: "regular"`` with the git blob sha1 of the file already on the branch,
  so no LFS / Xet transfer ever happens and unchanged files are skipped client side;
* 404s carry ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` (no body on HEAD),
  which ``huggingface_hub`` turns into ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` /
  ``RemoteEntryNotFoundError`` (a subclass of ``EntryNotFoundError``);
* with ``require_token=True`` (default) writes and reads of private repos need an ``Authorization`` header (any
  value is accepted); anonymous access to a private repo answers 401 like the Hub (-> RepositoryNotFoundError);
* ``resolve`` answers ``X-Repo-Commit``, a quoted ``ETag`` (the git blob sha1), ``Content-Length`` and honours a
  single ``Range: bytes=...`` (206 / 416).

Using it from pytest
--------------------
``tests/conftest.py`` registers this module as a pytest plugin (``pytest_plugins = ["hub_server"]``;
``tests/`` is on ``sys.path`` through ``pythonpath`` in pyproject.toml), so a test just asks for the fixture::

    def test_push(local_hub, tmp_path):
        from huggingface_hub import create_repo, upload_folder, snapshot_download
        create_repo("user/idx", repo_type="dataset", private=True)
        ...

The function-scoped ``local_hub`` fixture yields a started `LocalHub` and, for the duration of the test only
(via ``monkeypatch``), makes every ``huggingface_hub`` entry point talk to it:

* environment: ``HF_ENDPOINT``, ``HF_HOME`` (fresh temp dir), ``HF_HUB_CACHE`` (``$HF_HOME/hub``),
  ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN`` (dummy ``hf_local_test_token``),
  ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``NO_PROXY`` += 127.0.0.1; it removes
  ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``HUGGINGFACE_HUB_CACHE``,
  ``HUGGING_FACE_HUB_TOKEN`` and ``HF_TOKEN_PATH``;
* because ``huggingface_hub`` reads these at import time, it also patches ``huggingface_hub.constants``
  (``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``, every path constant
  under ``HF_HOME``, ``HF_HUB_CACHE``...), the module-level ``huggingface_hub.hf_api.api.endpoint`` behind the
  top-level functions (``huggingface_hub.create_repo`` etc.), and, if those modules are already imported,
  ``datasets.config`` and ``diffusers.utils.constants`` endpoint/offline constants;
* it closes ``huggingface_hub``'s shared HTTP session before and after the test.

So a test needs nothing else: plain ``huggingface_hub`` calls (module functions or a ``HfApi()`` built inside the
test) hit the local hub and cache into the per-test ``HF_HOME``.  Things a test must NOT rely on:

* an ``HfApi`` instance (or anything caching ``constants.ENDPOINT``) created *before* the fixture ran keeps its
  old endpoint - build ``HfApi()`` inside the test, or pass ``endpoint=local_hub.endpoint``;
* code that did ``from huggingface_hub.constants import HF_HUB_CACHE`` (or similar) at import time keeps the old
  value; pass ``cache_dir=`` explicitly in such code paths;
* a module first imported *during* the test reads the patched environment and keeps it afterwards.

Outside pytest (scripts, other fixtures)::

    with LocalHub() as hub:                     # or hub = LocalHub(); hub.start(); ...; hub.stop()
        api = HfApi(endpoint=hub.endpoint, token="x")
        hf_hub_download(..., endpoint=hub.endpoint)   # functions taking endpoint=

    # or patch globally with a pytest MonkeyPatch (e.g. for a session-scoped fixture):
    with LocalHub() as hub, pytest.MonkeyPatch.context() as mp:
        configure_huggingface_hub(mp, hub.endpoint, hf_home=some_dir)

Useful attributes: ``hub.endpoint`` ("http://127.0.0.1:PORT"), ``hub.requests`` (list of ``(method, path)``
received, for asserting e.g. that ``local_files_only=True`` made no request), ``hub.clear_requests()``,
``hub.hf_home`` (fixture only), ``hub.new_cache_dir()`` (a fresh, empty cache directory),
``hub.username`` (namespace used when ``create_repo`` gets a bare name; ``whoami`` returns it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = ["LocalHub", "configure_huggingface_hub", "local_hub"]

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_GITATTRIBUTES = (
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
    "*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    "*.npy filter=lfs diff=lfs merge=lfs -text\n"
    "*.npz filter=lfs diff=lfs merge=lfs -text\n"
    "*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    "*.parquet filter=lfs diff=lfs merge=lfs -text\n"
    "*.pt filter=lfs diff=lfs merge=lfs -text\n"
    "*.pth filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.zip filter=lfs diff=lfs merge=lfs -text\n"
).encode()
_COPY_CHUNK = 1 << 20


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha1(data: bytes) -> str:
    # Same id as `git hash-object` (and huggingface_hub's `sha.git_hash`), so unchanged files are detected.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An HTTP error answered by the fake hub (status, X-Error-Code, message)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = extra


@dataclass
class _Commit:
    oid: str
    parents: list[str]
    files: dict[str, str]  # path -> blob oid
    title: str
    message: str
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    sdk: str | None = None
    gated: Any = False
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)


@dataclass
class _Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: tuple[str, int, int] | None = None  # (path, start, length) streamed from disk


class LocalHub:
    """A fake Hugging Face Hub served over HTTP on 127.0.0.1 (see module docstring).

    Args:
        root: directory for blobs; a temporary directory (removed on `stop`) when omitted.
        username: namespace for bare repo names and the identity returned by ``whoami``.
        require_token: writes and private-repo reads need an ``Authorization`` header (any token accepted).
        initial_gitattributes: new repos start with a ``.gitattributes`` commit, as on the Hub.
        tree_page_size: entries per page of the tree API (the Hub uses 1000, 50 with ``expand``).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        username: str = "user",
        require_token: bool = True,
        initial_gitattributes: bool = True,
        tree_page_size: int = 1000,
    ) -> None:
        self._own_root = root is None
        self.root = str(root) if root is not None else None
        self.username = username
        self.require_token = require_token
        self.initial_gitattributes = initial_gitattributes
        self.tree_page_size = tree_page_size
        self.requests: list[tuple[str, str]] = []
        self.hf_home: str | None = None
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blob_sizes: dict[str, int] = {}
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.endpoint = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalHub":
        if self._server is not None:
            return self
        if self.root is None:
            self.root = tempfile.mkdtemp(prefix="localhub-")
        os.makedirs(os.path.join(self.root, "blobs"), exist_ok=True)
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # unblock handler threads idling on keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._own_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests
    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def new_cache_dir(self) -> str:
        """A fresh, empty directory usable as ``cache_dir=`` (removed with the hub's root)."""
        if self.root is None:
            raise RuntimeError("LocalHub is not started")
        path = os.path.join(self.root, "caches", uuid.uuid4().hex[:12])
        os.makedirs(path)
        return path

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.endpoint}/{_URL_PREFIXES[repo_type]}{repo_id}"

    # ------------------------------------------------------------------ storage
    def _blob_path(self, oid: str) -> str:
        return os.path.join(self.root, "blobs", oid[:2], oid)

    def _store_blob(self, data: bytes) -> str:
        oid = _git_blob_sha1(data)
        path = self._blob_path(oid)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        with self._lock:
            self._blob_sizes[oid] = len(data)
        return oid

    def _new_commit(self, repo: _Repo, parents: list[str], files: dict[str, str], title: str, message: str) -> _Commit:
        date = _now()
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parents}\n{sorted(files.items())}\n{title}\n{date}"
        seed += f"\n{next(self._counter)}"
        commit = _Commit(hashlib.sha1(seed.encode()).hexdigest(), parents, files, title, message, date)
        repo.commits[commit.oid] = commit
        return commit

    def _get_repo(self, repo_type: str, repo_id: str, auth: bool, *, write: bool = False) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if self.require_token and not auth and (write or repo.private):
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        return repo

    @staticmethod
    def _resolve(repo: _Repo, revision: str) -> str:
        """Commit oid for a branch, tag, PR ref, or (short) commit sha; RevisionNotFound otherwise."""
        rev = revision
        for prefix, table in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
            if rev.startswith(prefix) and rev[len(prefix) :] in table:
                return table[rev[len(prefix) :]]
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        match = re.fullmatch(r"refs/pr/(\d+)", rev)
        if match and int(match[1]) in repo.pull_requests:
            return repo.pull_requests[int(match[1])]
        if rev in repo.commits:
            return rev
        if _HEX_RE.fullmatch(rev):
            candidates = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(candidates) == 1:
                return candidates[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(self, repo: _Repo, revision: str) -> _Commit:
        return repo.commits[self._resolve(repo, revision)]

    # ------------------------------------------------------------------ HTTP dispatch
    def handle(self, method: str, raw_path: str, headers, body: bytes) -> _Response:
        with self._lock:
            self.requests.append((method, raw_path))
        split = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        segments = [s for s in split.path.split("/") if s != ""]
        auth = bool(headers.get("Authorization"))
        ctx = _Ctx(method, split.path, query, headers, body, auth)
        if segments[:1] == ["api"]:
            return self._handle_api(ctx, segments[1:])
        return self._handle_resolve(ctx, segments)

    def _handle_api(self, ctx: "_Ctx", seg: list[str]) -> _Response:
        m = ctx.method
        if seg == ["whoami-v2"] and m == "GET":
            if not ctx.auth:
                raise HubError(401, "Invalid credentials in Authorization header")
            return _json({"type": "user", "id": "0" * 24, "name": self.username, "fullname": self.username,
                          "orgs": [], "auth": {"type": "access_token",
                                               "accessToken": {"displayName": "local", "role": "write"}}})
        if seg == ["agent-harnesses"] and m == "GET":
            return _json({"standardEnvVars": [], "harnesses": {}})
        if seg == ["validate-yaml"] and m == "POST":
            return _json({"errors": [], "warnings": []})
        if seg == ["repos", "create"] and m == "POST":
            return self._api_create_repo(ctx)
        if seg == ["repos", "delete"] and m == "DELETE":
            return self._api_delete_repo(ctx)
        if len(seg) >= 2 and seg[0] in _REPO_TYPES:
            repo_type = _REPO_TYPES[seg[0]]
            if len(seg) == 2:
                repo_id, rest = unquote(seg[1]), []
            else:
                repo_id, rest = f"{unquote(seg[1])}/{unquote(seg[2])}", seg[3:]
            return self._handle_repo_api(ctx, repo_type, repo_id, rest)
        raise HubError(404, f"Not implemented by LocalHub: {m} {ctx.path}")

    def _handle_repo_api(self, ctx: "_Ctx", repo_type: str, repo_id: str, rest: list[str]) -> _Response:
        m, action = ctx.method, (rest[0] if rest else "")
        if action == "" and m == "GET":
            return self._api_info(ctx, repo_type, repo_id, "main")
        if action == "revision" and m == "GET":
            rev, _ = _take_revision(rest[1:])
            return self._api_info(ctx, repo_type, repo_id, rev)
        if action == "tree" and m == "GET":
            rev, path = _take_revision(rest[1:])
            return self._api_tree(ctx, repo_type, repo_id, rev, path)
        if action == "paths-info" and m == "POST":
            rev, _ = _take_revision(rest[1:])
            return self._api_paths_info(ctx, repo_type, repo_id, rev)
        if action == "preupload" and m == "POST":
            rev, _ = _take_revision(rest[1:])
            return self._api_preupload(ctx, repo_type, repo_id, rev)
        if action == "commit" and m == "POST":
            rev, _ = _take_revision(rest[1:])
            return self._api_commit(ctx, repo_type, repo_id, rev)
        if action == "branch" and m in ("POST", "DELETE"):
            return self._api_branch(ctx, repo_type, repo_id, "/".join(unquote(s) for s in rest[1:]))
        if action == "tag" and m in ("POST", "DELETE"):
            return self._api_tag(ctx, repo_type, repo_id, "/".join(unquote(s) for s in rest[1:]))
        if action == "refs" and m == "GET":
            return self._api_refs(ctx, repo_type, repo_id)
        if action == "commits" and m == "GET":
            rev, _ = _take_revision(rest[1:])
            return self._api_commits(ctx, repo_type, repo_id, rev)
        if action == "settings" and m == "PUT":
            return self._api_settings(ctx, repo_type, repo_id)
        raise HubError(404, f"Not implemented by LocalHub: {m} {ctx.path}")

    # ------------------------------------------------------------------ repos
    def _api_create_repo(self, ctx: "_Ctx") -> _Response:
        if self.require_token and not ctx.auth:
            raise HubError(401, "Invalid username or password.")
        payload = ctx.json()
        name = payload.get("name") or ""
        namespace = payload.get("organization") or self.username
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIXES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not (_NAME_RE.fullmatch(name) and _NAME_RE.fullmatch(namespace)) or len(name) > 96:
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        url = self.repo_url(repo_id, repo_type)
        visibility = payload.get("visibility")
        private = visibility in ("private", "protected") if visibility is not None else bool(payload.get("private"))
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(409, f"You already created this {repo_type} repo", url=url)
            repo = _Repo(repo_type, repo_id, private, _now(), sdk=payload.get("sdk"))
            files = {".gitattributes": self._store_blob(_GITATTRIBUTES)} if self.initial_gitattributes else {}
            commit = self._new_commit(repo, [], files, "initial commit", "")
            repo.branches["main"] = commit.oid
            self._repos[(repo_type, repo_id)] = repo
        return _json({"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _api_delete_repo(self, ctx: "_Ctx") -> _Response:
        payload = ctx.json()
        repo_id = f"{payload.get('organization') or self.username}/{payload.get('name')}"
        repo_type = payload.get("type") or "model"
        with self._lock:
            self._get_repo(repo_type, repo_id, ctx.auth, write=True)
            del self._repos[(repo_type, repo_id)]
        return _json({})

    def _api_settings(self, ctx: "_Ctx", repo_type: str, repo_id: str) -> _Response:
        payload = ctx.json()
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth, write=True)
            if payload.get("visibility") is not None:
                repo.private = payload["visibility"] in ("private", "protected")
            elif payload.get("private") is not None:
                repo.private = bool(payload["private"])
            if "gated" in payload:
                repo.gated = payload["gated"]
        return _json({})

    def _api_info(self, ctx: "_Ctx", repo_type: str, repo_id: str, revision: str) -> _Response:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth)
            commit = self._commit(repo, revision)
            siblings = [
                {"rfilename": p, "size": self._blob_sizes[o], "blobId": o} for p, o in sorted(commit.files.items())
            ]
            info: dict[str, Any] = {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": repo.gated,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(s["size"] for s in siblings),
            }
            readme = commit.files.get("README.md")
        if repo_type == "model":
            info["modelId"] = repo_id
        if repo_type == "space":
            info["sdk"] = repo.sdk
        card = _card_data(self._blob_path(readme)) if readme else None
        if card is not None:
            info["cardData"] = card
        return _json(info)

    # ------------------------------------------------------------------ trees
    def _tree_oid(self, files: dict[str, str], directory: str) -> str:
        prefix = directory + "/"
        listing = "\n".join(f"{p[len(prefix):]} {o}" for p, o in sorted(files.items()) if p.startswith(prefix))
        return hashlib.sha1(f"tree\n{listing}".encode()).hexdigest()

    def _last_commit(self, repo: _Repo, commit: _Commit, path: str, is_dir: bool) -> dict:
        def signature(c: _Commit):
            if is_dir:
                prefix = path + "/"
                return tuple(sorted((p, o) for p, o in c.files.items() if p.startswith(prefix)))
            return c.files.get(path)

        current, sig = commit, signature(commit)
        while current.parents and signature(repo.commits[current.parents[0]]) == sig:
            current = repo.commits[current.parents[0]]
        return {"id": current.oid, "title": current.title, "date": current.date}

    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict:
        if path in commit.files:
            oid = commit.files[path]
            entry = {"type": "file", "oid": oid, "size": self._blob_sizes[oid], "path": path}
        else:
            entry = {"type": "directory", "oid": self._tree_oid(commit.files, path), "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, path, entry["type"] == "directory")
        return entry

    @staticmethod
    def _directories(files: dict[str, str]) -> set[str]:
        dirs = set()
        for p in files:
            parts = p.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return dirs

    def _api_tree(self, ctx: "_Ctx", repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        recursive = ctx.query.get("recursive", "false").lower() in ("1", "true")
        expand = ctx.query.get("expand", "false").lower() in ("1", "true")
        cursor = int(ctx.query.get("cursor") or 0)
        path = path.strip("/")
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth)
            commit = self._commit(repo, revision)
            dirs = self._directories(commit.files)
            if path and path not in dirs:
                raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
            prefix = path + "/" if path else ""
            candidates = [p for p in itertools.chain(dirs, commit.files) if p.startswith(prefix)]
            if not recursive:
                candidates = [p for p in candidates if "/" not in p[len(prefix):]]
            candidates.sort()
            page_size = max(1, min(self.tree_page_size, 50) if expand else self.tree_page_size)
            page = [self._entry(repo, commit, p, expand) for p in candidates[cursor : cursor + page_size]]
        response = _json(page)
        if cursor + page_size < len(candidates):
            params = dict(ctx.query, cursor=str(cursor + page_size))
            host = ctx.headers.get("Host") or f"127.0.0.1:{self.port}"
            response.headers["Link"] = f'<http://{host}{ctx.path}?{urlencode(params)}>; rel="next"'
        return response

    def _api_paths_info(self, ctx: "_Ctx", repo_type: str, repo_id: str, revision: str) -> _Response:
        if "json" in (ctx.headers.get("Content-Type") or ""):
            form = ctx.json()
            paths = form.get("paths") or []
            expand = bool(form.get("expand"))
        else:
            form = parse_qs(ctx.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = (form.get("expand") or ["false"])[-1].lower() in ("1", "true")
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth)
            commit = self._commit(repo, revision)
            dirs = self._directories(commit.files)
            found = [p.strip("/") for p in paths if p.strip("/") in commit.files or p.strip("/") in dirs]
            return _json([self._entry(repo, commit, p, expand) for p in found])

    # ------------------------------------------------------------------ refs
    def _api_refs(self, ctx: "_Ctx", repo_type: str, repo_id: str) -> _Response:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth)
            data = {
                "branches": [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items()
                ],
                "converts": [],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in repo.tags.items()],
            }
            if ctx.query.get("include_prs"):
                data["pullRequests"] = [
                    {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": o}
                    for n, o in sorted(repo.pull_requests.items())
                ]
        return _json(data)

    def _api_commits(self, ctx: "_Ctx", repo_type: str, repo_id: str, revision: str) -> _Response:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth)
            commit, items = self._commit(repo, revision), []
            while True:
                items.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                              "date": commit.date, "authors": [{"user": self.username}]})
                if not commit.parents:
                    break
                commit = repo.commits[commit.parents[0]]
        return _json(items)

    def _api_branch(self, ctx: "_Ctx", repo_type: str, repo_id: str, branch: str) -> _Response:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth, write=True)
            if ctx.method == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return _json({})
            if not branch or branch.startswith("refs/") or not re.fullmatch(r"[A-Za-z0-9._/-]+", branch):
                raise HubError(400, f"Invalid branch name: {branch}")
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            payload = ctx.json()
            if payload.get("emptyBranch"):
                target = self._new_commit(repo, [], {}, "initial commit", "").oid
            else:
                target = self._resolve(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = target
        return _json({})

    def _api_tag(self, ctx: "_Ctx", repo_type: str, repo_id: str, rev_or_tag: str) -> _Response:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth, write=True)
            if ctx.method == "DELETE":
                if rev_or_tag not in repo.tags:
                    raise HubError(404, f"Invalid rev id: {rev_or_tag}", "RevisionNotFound")
                del repo.tags[rev_or_tag]
                return _json({})
            tag = ctx.json().get("tag") or ""
            target = self._resolve(repo, rev_or_tag)
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = target
        return _json({})

    # ------------------------------------------------------------------ uploads
    def _writable_ref(self, repo: _Repo, revision: str) -> tuple[str, Any]:
        branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        if branch in repo.branches:
            return "branch", branch
        match = re.fullmatch(r"refs/pr/(\d+)", revision)
        if match and int(match[1]) in repo.pull_requests:
            return "pr", int(match[1])
        if revision in repo.commits or revision in repo.tags:
            raise HubError(400, f"Cannot commit to {revision}: not a branch", "RevisionNotFound")
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _api_preupload(self, ctx: "_Ctx", repo_type: str, repo_id: str, revision: str) -> _Response:
        payload = ctx.json()
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth, write=True)
            commit = self._commit(repo, revision)
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": commit.files.get(f["path"])}
                for f in payload.get("files", [])
            ]
        return _json({"files": files, "commitOid": commit.oid})

    def _api_commit(self, ctx: "_Ctx", repo_type: str, repo_id: str, revision: str) -> _Response:
        lines = [json.loads(line) for line in ctx.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "First line of the commit payload must be the header")
        header = lines[0].get("value") or {}
        additions: list[tuple[str, Any]] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = _check_path(value.get("path", ""), folder=key == "deletedFolder")
            if key == "file":
                content = value.get("content", "")
                if value.get("encoding", "base64") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except (binascii.Error, ValueError) as e:
                        raise HubError(400, f"Invalid base64 content for {path}: {e}") from None
                else:
                    data = content.encode()
                additions.append(("file", (path, self._store_blob(data))))
            elif key in ("deletedFile", "deletedFolder"):
                additions.append((key, path))
            elif key == "lfsFile":
                raise HubError(400, f"LocalHub does not support LFS uploads ({path}); preupload answers 'regular'")
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        create_pr = ctx.query.get("create_pr") in ("1", "true", "True")
        parent = header.get("parentCommit")
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth, write=True)
            if create_pr:
                base = self._resolve(repo, parent or revision)
                pr_num = max(repo.pull_requests, default=0) + 1
                repo.pull_requests[pr_num] = base
                ref: tuple[str, Any] = ("pr", pr_num)
            else:
                ref = self._writable_ref(repo, revision)
                base = repo.branches[ref[1]] if ref[0] == "branch" else repo.pull_requests[ref[1]]
                if parent is not None and self._resolve(repo, parent) != base:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[base].files)
            for kind, arg in additions:
                if kind == "file":
                    files[arg[0]] = arg[1]
                elif kind == "deletedFile":
                    if arg not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {arg}", "EntryNotFound")
                    del files[arg]
                else:
                    prefix = arg + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {arg}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            commit = self._new_commit(repo, [base], files, header.get("summary") or "", header.get("description") or "")
            if ref[0] == "branch":
                repo.branches[ref[1]] = commit.oid
            else:
                repo.pull_requests[ref[1]] = commit.oid
        repo_url = self.repo_url(repo_id, repo_type)
        data = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{repo_url}/commit/{commit.oid}",
            "hookOutput": "",
        }
        if ref[0] == "pr":
            data["pullRequestUrl"] = f"{repo_url}/discussions/{ref[1]}"
        return _json(data)

    # ------------------------------------------------------------------ downloads
    def _handle_resolve(self, ctx: "_Ctx", seg: list[str]) -> _Response:
        repo_type = "model"
        if seg and seg[0] in _REPO_TYPES and seg[0] != "models":
            repo_type, seg = _REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 3 and seg[1] == "resolve":
            repo_id, rest = unquote(seg[0]), seg[2:]
        elif len(seg) >= 4 and seg[2] == "resolve":
            repo_id, rest = f"{unquote(seg[0])}/{unquote(seg[1])}", seg[3:]
        else:
            raise HubError(404, f"Not implemented by LocalHub: {ctx.method} {ctx.path}")
        if ctx.method not in ("GET", "HEAD"):
            raise HubError(405, "Method not allowed")
        revision, filename = _take_revision(rest)
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, ctx.auth)
            commit = self._commit(repo, revision)
            oid = commit.files.get(filename)
            if oid is None:
                raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
            size = self._blob_sizes[oid]
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename.rsplit('/', 1)[-1])}",
        }
        start, length, status = 0, size, 200
        byte_range = _parse_range(ctx.headers.get("Range"), size)
        if byte_range == "invalid":
            headers["Content-Range"] = f"bytes */{size}"
            return _Response(416, headers, b"")
        if byte_range is not None:
            start, end = byte_range
            length, status = end - start + 1, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return _Response(status, headers, file=(self._blob_path(oid), start, length))


@dataclass
class _Ctx:
    method: str
    path: str
    query: dict[str, str]
    headers: Any
    body: bytes
    auth: bool

    def json(self) -> dict:
        if not self.body:
            return {}
        try:
            data = json.loads(self.body)
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from None
        return data if isinstance(data, dict) else {}


def _json(data: Any, status: int = 200) -> _Response:
    return _Response(status, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(data).encode())


def _take_revision(segments: list[str]) -> tuple[str, str]:
    """Split raw URL segments into (revision, path); accepts quoted (``refs%2Fpr%2F1``) and plain ``refs/pr/1``."""
    if not segments:
        return "main", ""
    if segments[0] == "refs" and len(segments) >= 3 and segments[1] in ("pr", "heads", "tags", "convert"):
        revision, rest = "/".join(unquote(s) for s in segments[:3]), segments[3:]
    else:
        revision, rest = unquote(segments[0]), segments[1:]
    return revision, "/".join(unquote(s) for s in rest)


def _check_path(path: str, folder: bool = False) -> str:
    clean = path.rstrip("/") if folder else path
    parts = clean.split("/")
    if not clean or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return clean


def _parse_range(value: str | None, size: int):
    """(start, end) for a single ``bytes=`` range, None to serve everything, "invalid" for a 416."""
    if not value:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value)
    if match is None:
        return None  # multi-range or unknown unit: serving the whole file is allowed
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        suffix = int(last)
        if suffix == 0:
            return "invalid"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return "invalid"
    return start, end


def _card_data(readme_path: str) -> dict | None:
    """YAML front matter of README.md as cardData, when PyYAML happens to be installed (optional)."""
    try:
        import yaml  # optional; the server itself only needs the standard library
    except ImportError:
        return None
    try:
        with open(readme_path, encoding="utf-8") as f:
            text = f.read()
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
        data = yaml.safe_load(match[1]) if match else None
    except Exception:
        return None
    return data if isinstance(data, dict) else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 120  # idle keep-alive connections are dropped after this many seconds
    hub: LocalHub

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.hub._lock:
                self.hub._connections.discard(self.connection)

    def log_message(self, format: str, *args) -> None:  # quiet: requests are recorded in hub.requests
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        try:
            response = self.hub.handle(self.command, self.path, self.headers, body)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            response = _json({"error": e.message, **e.extra}, e.status)
            response.headers.update(headers)
        except Exception as e:  # pragma: no cover - a bug in the fake: make it visible client side
            response = _json({"error": f"LocalHub internal error: {e!r}", "traceback": traceback.format_exc()}, 500)
        self._send(response)

    def _send(self, response: _Response) -> None:
        length = response.file[2] if response.file is not None else len(response.body)
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        if response.file is None:
            self.wfile.write(response.body)
            return
        path, start, remaining = response.file
        with open(path, "rb") as f:
            f.seek(start)
            while remaining > 0:
                chunk = f.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch


# ---------------------------------------------------------------------- huggingface_hub configuration
def configure_huggingface_hub(monkeypatch, endpoint: str, hf_home: str, token: str = "hf_local_test_token") -> None:
    """Point ``huggingface_hub`` (and, if imported, ``datasets`` / ``diffusers``) at ``endpoint`` using
    ``monkeypatch`` (a pytest ``MonkeyPatch``), with a fresh cache under ``hf_home``. Undone with the monkeypatch."""
    import sys

    from huggingface_hub import constants

    hf_home = os.path.abspath(hf_home)
    hub_cache = os.path.join(hf_home, "hub")
    os.makedirs(hub_cache, exist_ok=True)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
        "HF_TOKEN": token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGINGFACE_HUB_CACHE",
                "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)

    # Constants read at import time: every path under the old HF_HOME moves under the new one.
    old_home = constants.HF_HOME
    for name in dir(constants):
        value = getattr(constants, name)
        if name.isupper() and isinstance(value, str) and old_home and value.startswith(old_home):
            monkeypatch.setattr(constants, name, hf_home + value[len(old_home) :])
    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HUGGINGFACE_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HF_XET_CACHE": env["HF_XET_CACHE"],
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    # Copies made at import time elsewhere in huggingface_hub.
    hf_api = sys.modules.get("huggingface_hub.hf_api")
    if hf_api is not None and hasattr(hf_api, "api"):
        monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # behind huggingface_hub.create_repo & co.
    cache_manager = sys.modules.get("huggingface_hub.utils._cache_manager")
    if cache_manager is not None and hasattr(cache_manager, "HF_HUB_CACHE"):
        monkeypatch.setattr(cache_manager, "HF_HUB_CACHE", hub_cache)
    http = sys.modules.get("huggingface_hub.utils._http")
    if http is not None and hasattr(http, "_HUB_ORIGINS") and hasattr(http, "_url_origin"):
        monkeypatch.setattr(http, "_HUB_ORIGINS", frozenset(http._HUB_ORIGINS | {http._url_origin(endpoint)}))

    # Other libraries of the stack, only if already imported (a later import reads the patched environment).
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        old_ds_home = str(getattr(datasets_config, "HF_CACHE_HOME", "") or "")
        for name in dir(datasets_config):  # datasets' own caches (HF_DATASETS_CACHE, modules...) move too
            value = getattr(datasets_config, name)
            if name.isupper() and old_ds_home and isinstance(value, (str, os.PathLike)):
                text = os.fspath(value)
                if isinstance(text, str) and text.startswith(old_ds_home):
                    moved = hf_home + text[len(old_ds_home) :]
                    monkeypatch.setattr(datasets_config, name, moved if isinstance(value, str) else type(value)(moved))
        for name, value in {
            "HF_ENDPOINT": endpoint,
            "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_HUB_OFFLINE": False,
            "HF_DATASETS_OFFLINE": False,
        }.items():
            if hasattr(datasets_config, name):
                monkeypatch.setattr(datasets_config, name, value)
    diffusers_constants = sys.modules.get("diffusers.utils.constants")
    if diffusers_constants is not None and hasattr(diffusers_constants, "HUGGINGFACE_CO_RESOLVE_ENDPOINT"):
        monkeypatch.setattr(diffusers_constants, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", endpoint)


def _close_hf_session() -> None:
    try:
        from huggingface_hub import close_session
    except ImportError:  # pragma: no cover
        return
    close_session()


try:
    import pytest
except ImportError:  # pragma: no cover - the server works without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def local_hub(monkeypatch, tmp_path_factory) -> Iterator[LocalHub]:
        """A started `LocalHub`; ``huggingface_hub`` points at it (fresh HF_HOME, dummy token) for this test."""
        hf_home = str(tmp_path_factory.mktemp("hf_home"))
        with LocalHub() as hub:
            hub.hf_home = hf_home
            configure_huggingface_hub(monkeypatch, hub.endpoint, hf_home)
            _close_hf_session()
            try:
                yield hub
            finally:
                _close_hf_session()

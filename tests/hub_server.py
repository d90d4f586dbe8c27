"""A loopback stand-in for the Hugging Face Hub, for real-HTTP tests of ``push_to_hub``.

``LocalHub`` runs a ``http.server.ThreadingHTTPServer`` on ``127.0.0.1`` (port 0) in a daemon thread and answers the
endpoints that ``huggingface_hub`` 2.4.0 calls to create and publish a repo and to download it back:

====================================================================  ===============================================
``POST /api/repos/create``                                            ``create_repo`` (409 when it exists)
``POST /api/validate-yaml``                                           README.md front matter check
``GET  /api/whoami-v2``                                               ``whoami`` (repo ids without a namespace)
``POST /api/{type}s/{ns}/{name}/preupload/{rev}``                     every file answered ``"regular"``
``POST /api/{type}s/{ns}/{name}/commit/{rev}``                        NDJSON commit (``file``/``deletedFile``/...)
``GET  /api/{type}s/{ns}/{name}[/revision/{rev}]``                    ``repo_info`` (``sha``, ``siblings``)
``GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]``                 ``list_repo_tree`` (``snapshot_download``)
``GET|HEAD /[{type}s/]{ns}/{name}/resolve/{rev}/{path}``              ``hf_hub_download`` (ETag, X-Repo-Commit)
====================================================================  ===============================================

Anything else answers 404 with a JSON ``{"error": ...}`` body and is listed in ``hub.unhandled``.

State you can assert on (all filled by the server thread; read it after the client call returned):

* ``hub.endpoint``: ``"http://127.0.0.1:PORT"``.
* ``hub.repos``: key -> ``{"private": bool, "type": "model", "files": {path: bytes}, "commits": [...]}``. The key is
  the repo id for models and ``"datasets/<id>"`` / ``"spaces/<id>"`` for the other types. ``files`` is the tip of
  ``main``; each commit is ``{"summary", "description", "oid", "revision"}`` (``revision`` is ``"main"`` or
  ``"refs/pr/N"`` for ``create_pr=True``). A new repo has no commit and no file (the real Hub adds ``.gitattributes``).
* ``hub.requests``: ``[(method, path_with_query, headers)]`` for every request, ``headers`` a dict with lower-case
  names, so ``headers.get("authorization") == "Bearer <token>"`` checks the token was sent.
* ``hub.unhandled``: ``[(method, path_with_query)]`` of the requests no route matched.
* ``hub.fail_commits``: set to an HTTP status (e.g. 500) to make the commit endpoint answer it with
  ``{"error": "..."}``; ``None`` (default) commits normally. Preupload is not affected (it is retried on 5xx).

Auth: with ``LocalHub(token="hf_x")`` write calls (create, preupload, commit, whoami) and reads of a private repo
need ``Authorization: Bearer hf_x``; with ``token=None`` any bearer token is accepted. A missing/wrong token gets 401.

Pointing huggingface_hub at it -- it reads ``HF_ENDPOINT`` (and ``HF_HUB_DISABLE_XET``, ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE``) into ``huggingface_hub.constants`` at *import* time, and the module-level functions
(``huggingface_hub.create_repo``, ``upload_folder``, ..., which diffusers' ``push_to_hub`` uses) are bound methods of
one ``HfApi()`` built at import, whose ``endpoint`` is fixed then. So, in process:

* ``HfApi(endpoint=hub.endpoint, token=...)`` works for its own calls, *but* two constants still need flipping:
  ``constants.HF_HUB_OFFLINE = False`` (tests/conftest.py sets ``HF_HUB_OFFLINE=1`` before the import, and then every
  request raises ``OfflineModeIsEnabled``, loopback included) and ``constants.HF_HUB_DISABLE_XET = True`` (hf_xet is
  installed here: without it ``upload_folder`` takes the Xet pipeline). ``snapshot_download`` / ``hf_hub_download``
  need ``endpoint=hub.endpoint`` passed too.
* Setting ``os.environ["HF_ENDPOINT"]`` after import does nothing in process.
* The ``local_hub`` fixture below patches everything needed (env *and* ``constants.ENDPOINT``,
  ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, ``constants.HF_HUB_DISABLE_XET``, ``constants.HF_HUB_OFFLINE``,
  ``constants.HF_HUB_CACHE`` and ``huggingface_hub.hf_api.api.endpoint``), so plain ``huggingface_hub.create_repo``,
  ``upload_folder``, ``snapshot_download`` and diffusers' ``push_to_hub`` reach the local hub with no argument.
* A subprocess only needs the env: ``HF_ENDPOINT=hub.endpoint HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1
  HF_TOKEN=<token> HF_HUB_OFFLINE=0`` (``hub.env()`` returns that dict).

Importable both as ``tests.hub_server`` and as ``hub_server`` (no package-relative imports).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

FAKE_TOKEN = "hf_localhub_fake_token_0123456789"
DEFAULT_BRANCH = "main"

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API_REPO_RE = re.compile(
    r"^/api/(?P<plural>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
    r"(?:/(?P<action>preupload|commit|revision|tree)/(?P<rev>[^/]+)(?:/(?P<rest>.*))?)?$"
)
_RESOLVE_RE = re.compile(
    r"^/(?:(?P<plural>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
)
_COMMIT_OID_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(data: bytes) -> str:
    """The git-sha1 of a blob, as the Hub reports it for regular files (``oid``, ``ETag``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _repo_key(repo_type: str, repo_id: str) -> str:
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


class _HubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more keys for the JSON body


class LocalHub:
    """Loopback Hub. Use as a context manager (or ``start()`` / ``close()``); see the module docstring."""

    def __init__(self, token: str | None = None, user: str = "me"):
        self.token = token
        self.user = user
        self.repos: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.fail_commits: int | None = None
        self.endpoint = ""
        self._lock = threading.RLock()
        # key -> {"branches": {name: oid}, "snapshots": {oid: {path: bytes}}, "created": iso, "n_pr": int}
        self._git: dict[str, dict[str, Any]] = {}
        self._n_commits = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should talk to this hub."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_TOKEN": self.token or FAKE_TOKEN,
        }

    # -- helpers for tests -----------------------------------------------------------------------------------------
    def authorizations(self) -> list[str | None]:
        """The Authorization header of every recorded request (``None`` where absent)."""
        return [headers.get("authorization") for _, _, headers in self.requests]

    def head(self, repo_id: str, repo_type: str = "model", revision: str = DEFAULT_BRANCH) -> str:
        """Commit oid a branch points to."""
        with self._lock:
            return self._git[_repo_key(repo_type, repo_id)]["branches"][revision]

    # -- state changes (called from handler threads) ---------------------------------------------------------------
    def _new_oid(self, *parts: Any) -> str:
        with self._lock:
            self._n_commits += 1
            seed = json.dumps([self._n_commits, *parts], default=str).encode()
        return hashlib.sha1(seed).hexdigest()

    def _create(self, repo_type: str, repo_id: str, private: bool) -> bool:
        key = _repo_key(repo_type, repo_id)
        with self._lock:
            if key in self.repos:
                return False
            oid = self._new_oid("init", key)
            self.repos[key] = {"private": private, "type": repo_type, "files": {}, "commits": []}
            self._git[key] = {"branches": {DEFAULT_BRANCH: oid}, "snapshots": {oid: {}}, "created": _now(), "n_pr": 0}
            return True

    def _lookup(self, repo_type: str, repo_id: str, authorization: str | None) -> str:
        key = _repo_key(repo_type, repo_id)
        with self._lock:
            repo = self.repos.get(key)
        if repo is None or (repo["private"] and not self._authorized(authorization)):
            status = 401 if authorization is None else 404
            raise _HubError(status, "Repository not found", code="RepoNotFound")
        return key

    def _resolve(self, key: str, revision: str) -> tuple[str, dict[str, bytes]]:
        with self._lock:
            git = self._git[key]
            oid = git["branches"].get(revision)
            if oid is None and _COMMIT_OID_RE.match(revision) and revision in git["snapshots"]:
                oid = revision
            if oid is None:
                raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            return oid, git["snapshots"][oid]

    def _authorized(self, authorization: str | None) -> bool:
        if authorization is None or not authorization.startswith("Bearer "):
            return False
        return self.token is None or authorization == f"Bearer {self.token}"

    def _commit(self, key: str, repo_id: str, revision: str, create_pr: bool, items: list[dict]) -> dict[str, Any]:
        if not items or items[0].get("key") != "header":
            raise _HubError(400, "First line of the commit payload must be the header")
        header = items[0].get("value") or {}
        with self._lock:
            git = self._git[key]
            base = DEFAULT_BRANCH if create_pr else revision
            if base not in git["branches"]:
                raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            parent = git["branches"][base]
            if header.get("parentCommit") not in (None, parent):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(git["snapshots"][parent])
            for item in items[1:]:
                kind, value = item.get("key"), item.get("value") or {}
                path = value.get("path", "")
                if kind == "file":
                    content = value.get("content", "")
                    if value.get("encoding") == "base64":
                        files[path] = base64.b64decode(content)
                    else:
                        files[path] = content.encode()
                elif kind == "deletedFile":
                    if path not in files:
                        raise _HubError(404, "A file with this name doesn't exist", code="EntryNotFound")
                    del files[path]
                elif kind == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [name for name in files if name.startswith(prefix)]:
                        del files[name]
                elif kind in ("lfsFile", "deletedEntry"):
                    raise _HubError(400, f"LocalHub does not handle '{kind}' lines (it answers preupload 'regular')")
                else:
                    raise _HubError(400, f"Unknown commit line key: {kind!r}")
            oid = self._new_oid(key, parent, header)
            pr_num = None
            if create_pr:
                git["n_pr"] += 1
                pr_num = git["n_pr"]
                target = f"refs/pr/{pr_num}"
            else:
                target = revision
            git["branches"][target] = oid
            git["snapshots"][oid] = files
            repo = self.repos[key]
            if target == DEFAULT_BRANCH:
                repo["files"] = files
            repo["commits"].append(
                {
                    "summary": header.get("summary"),
                    "description": header.get("description"),
                    "oid": oid,
                    "revision": target,
                }
            )
        url_prefix = f"{self.endpoint}/{key}"
        return {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{url_prefix}/commit/{oid}",
            "hookOutput": "",
            "pullRequestUrl": f"{url_prefix}/discussions/{pr_num}" if pr_num is not None else None,
        }


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    server_version = "LocalHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # -- plumbing --------------------------------------------------------------------------------------------------
    def _record(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path, headers))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
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

    def _json_body(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as err:
            raise _HubError(400, f"Invalid JSON body: {err}") from err

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, ctype: str = "") -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers, "application/json; charset=utf-8")

    def _send_error(self, err: _HubError) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json(err.status, {"error": err.message, **err.extra}, headers)

    def _require_auth(self) -> None:
        if not self.hub._authorized(self.headers.get("Authorization")):
            raise _HubError(401, "Invalid credentials in Authorization header")

    # -- dispatch --------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._record()
        url = urlsplit(self.path)
        self._query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path, method = url.path, self.command
        try:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo()
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml()
            if method == "GET" and path == "/api/whoami-v2":
                return self._whoami()
            match = _API_REPO_RE.match(path)
            if match:
                repo_type, repo_id = _TYPES[match["plural"]], match["repo"]
                action, rev = match["action"], unquote(match["rev"] or DEFAULT_BRANCH)
                if method == "POST" and action == "preupload":
                    return self._preupload(repo_type, repo_id, rev)
                if method == "POST" and action == "commit":
                    return self._commit(repo_type, repo_id, rev)
                if method == "GET" and action in (None, "revision") and not match["rest"]:
                    return self._repo_info(repo_type, repo_id, rev)
                if method == "GET" and action == "tree":
                    return self._tree(repo_type, repo_id, rev, unquote(match["rest"] or ""))
            match = _RESOLVE_RE.match(path)
            if match and method in ("GET", "HEAD"):
                repo_type = _TYPES[match["plural"]] if match["plural"] else "model"
                return self._resolve_file(repo_type, match["repo"], unquote(match["rev"]), unquote(match["path"]))
            with self.hub._lock:
                self.hub.unhandled.append((method, self.path))
            raise _HubError(404, f"LocalHub: no route for {method} {url.path}")
        except _HubError as err:
            self._send_error(err)
        except Exception as err:  # a bug in this server: surface it to the client instead of hanging
            self._send_json(500, {"error": f"LocalHub internal error: {type(err).__name__}: {err}"})

    # -- endpoints -------------------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        payload = self._json_body()
        self._require_auth()
        name = payload.get("name")
        if not name:
            raise _HubError(400, "Missing repo name")
        repo_type = payload.get("type") or "model"
        if repo_type not in _TYPES.values():
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{name}"
        # huggingface_hub >= 1.x sends "visibility"; older clients sent "private".
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        key = _repo_key(repo_type, repo_id)
        url = f"{self.hub.endpoint}/{key}"
        if not self.hub._create(repo_type, repo_id, private):
            # create_repo(exist_ok=True) swallows the 409 and then reads `url` from this body (KeyError without it).
            raise _HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        self._send_json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(key.encode()).hexdigest()[:24]})

    def _validate_yaml(self) -> None:
        payload = self._json_body()
        content = payload.get("content") or ""
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", content, re.DOTALL)
        if match:
            try:
                import yaml

                data = yaml.safe_load(match.group(1))
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "YAML metadata must be a mapping"})
            except ImportError:
                pass
            except Exception as err:  # yaml.YAMLError
                errors.append({"message": f"Invalid YAML in README.md metadata: {err}"})
        if errors:
            self._send_json(400, {"errors": errors, "warnings": []})
        else:
            self._send_json(200, {"errors": [], "warnings": []})

    def _whoami(self) -> None:
        self._require_auth()
        self._send_json(
            200,
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.hub.user,
                "fullname": self.hub.user,
                "email": None,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "localhub", "role": "write"}},
            },
        )

    def _preupload(self, repo_type: str, repo_id: str, rev: str) -> None:
        payload = self._json_body()
        self._require_auth()
        key = self.hub._lookup(repo_type, repo_id, self.headers.get("Authorization"))
        create_pr = self._query.get("create_pr") == "1"
        oid, files = self.hub._resolve(key, DEFAULT_BRANCH if create_pr else rev)
        answer = []
        for entry in payload.get("files", []):
            existing = files.get(entry["path"])
            answer.append(
                {
                    "path": entry["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        self._send_json(200, {"files": answer, "commitOid": oid})

    def _commit(self, repo_type: str, repo_id: str, rev: str) -> None:
        raw = self._read_body()
        self._require_auth()
        key = self.hub._lookup(repo_type, repo_id, self.headers.get("Authorization"))
        if self.hub.fail_commits is not None:
            status = self.hub.fail_commits
            raise _HubError(status, f"LocalHub: commit rejected on purpose (fail_commits={status})")
        try:
            items = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise _HubError(400, f"Invalid NDJSON commit payload: {err}") from err
        create_pr = self._query.get("create_pr") == "1"
        self._send_json(200, self.hub._commit(key, repo_id, rev, create_pr, items))

    def _repo_info(self, repo_type: str, repo_id: str, rev: str) -> None:
        key = self.hub._lookup(repo_type, repo_id, self.headers.get("Authorization"))
        oid, files = self.hub._resolve(key, rev)
        with self.hub._lock:
            repo, created = self.hub.repos[key], self.hub._git[key]["created"]
            blobs = self._query.get("blobs", "").lower() == "true"
            siblings = []
            for path in sorted(files):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sibling.update(size=len(files[path]), blobId=git_blob_oid(files[path]))
                siblings.append(sibling)
            info = {
                "_id": hashlib.sha1(key.encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": oid,
                "private": repo["private"],
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": created,
                "lastModified": _now(),
                "siblings": siblings,
            }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send_json(200, info)

    def _tree(self, repo_type: str, repo_id: str, rev: str, sub: str) -> None:
        key = self.hub._lookup(repo_type, repo_id, self.headers.get("Authorization"))
        _, files = self.hub._resolve(key, rev)
        recursive = self._query.get("recursive", "").lower() in ("true", "1")
        sub = sub.strip("/")
        prefix = f"{sub}/" if sub else ""
        if sub and not any(path.startswith(prefix) for path in files):
            raise _HubError(404, f"{sub} does not exist on {rev}", code="EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            # directories between `sub` and the file
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    folder,
                    {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder},
                )
            if recursive or len(parts) == 1:
                entries[path] = {
                    "type": "file",
                    "oid": git_blob_oid(files[path]),
                    "size": len(files[path]),
                    "path": path,
                }
        self._send_json(200, list(entries.values()))

    def _resolve_file(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        key = self.hub._lookup(repo_type, repo_id, self.headers.get("Authorization"))
        oid, files = self.hub._resolve(key, rev)
        if path not in files:
            raise _HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": oid})
        data = files[path]
        headers = {
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        range_match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if range_match and self.command == "GET":
            start = int(range_match[1])
            end = int(range_match[2]) if range_match[2] else len(data) - 1
            if start >= len(data):
                raise _HubError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"}
                )
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, "application/octet-stream")


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """A running ``LocalHub`` (token ``FAKE_TOKEN``) that in-process huggingface_hub calls reach with no argument.

    Sets ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_OFFLINE=0``,
    ``HF_TOKEN=FAKE_TOKEN`` and ``HF_HUB_CACHE`` (a fresh temp folder) in ``os.environ`` (so subprocesses inherit
    them) and patches the matching ``huggingface_hub.constants`` plus the endpoint of the module-level ``HfApi``.
    """
    from huggingface_hub import constants, hf_api

    cache = tmp_path_factory.mktemp("hf-hub-cache")
    with LocalHub(token=FAKE_TOKEN) as hub:
        for name, value in hub.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
        yield hub

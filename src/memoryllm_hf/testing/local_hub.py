"""A small Hub-compatible HTTP server on 127.0.0.1 for offline tests and demos of Hub workflows.

It speaks the subset of the Hugging Face Hub API that `huggingface_hub`'s `HfApi`, `hf_hub_download`, transformers'
`from_pretrained`/`push_to_hub` and `ModelCard` use: whoami, repo creation, preupload (every file "regular", so the
bytes travel base64-inline in the commit and never through LFS/Xet), NDJSON commits, branches, refs, commits, tree,
paths-info, model info, and HEAD/GET `resolve` by branch or commit sha.

Storage is content-addressed and in memory: blobs are keyed by their git blob sha1, each commit records the whole
file tree, so every older revision stays readable. Model repos only; no LFS, tags, pull requests or access control
(writes just need some bearer token).
"""

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's content (what the Hub calls a regular file's `oid`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An HTTP error answered with the Hub's `X-Error-Code` / `X-Error-Message` headers."""

    def __init__(self, status: int, message: str, code: str | None = None, **fields):
        super().__init__(message)
        self.status, self.message, self.code, self.fields = status, message, code, fields


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, str]  # path -> blob id
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        name = revision.removeprefix("refs/heads/")
        if name in self.branches:
            return self.commits[self.branches[name]]
        if revision in self.commits:
            return self.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubStore:
    """Repos, commits and blobs of the local Hub (thread-safe)."""

    def __init__(self, user: str):
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self._counter = 0

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return self.repos[repo_id]

    def create_repo(self, repo_id: str) -> Repo:
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", url=repo_id)
            repo = self.repos[repo_id] = Repo(repo_id)
            self.commit(repo, "main", {".gitattributes": GITATTRIBUTES}, [], "initial commit", "")
            return repo

    def commit(
        self,
        repo: Repo,
        branch: str,
        added: dict[str, bytes],
        deleted: list[str],
        title: str,
        message: str,
        parent_commit: str | None = None,
    ) -> Commit:
        """Apply additions/deletions on top of `branch` (created by the first commit only) as one new commit."""
        with self.lock:
            head = repo.branches.get(branch)
            if head is None and repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent_commit is not None and parent_commit != head:
                raise HubError(412, f"parent commit {parent_commit} is not the head of {branch} ({head})")
            files = dict(repo.commits[head].files) if head else {}
            for path in deleted:
                matches = [p for p in files if p == path or p.startswith(path.rstrip("/") + "/")]
                if not matches:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in matches:
                    del files[p]
            for path, data in added.items():
                blob = git_blob_id(data)
                self.blobs[blob] = data
                files[path] = blob
            self._counter += 1
            date = _now()
            oid = hashlib.sha1(
                json.dumps([head, sorted(files.items()), title, message, date, self._counter]).encode()
            ).hexdigest()
            repo.commits[oid] = Commit(oid, head, files, title, message, self.user, date)
            repo.branches[branch] = oid
            return repo.commits[oid]

    def history(self, repo: Repo, commit: Commit) -> list[Commit]:
        chain = [commit]
        while chain[-1].parent:
            chain.append(repo.commits[chain[-1].parent])
        return chain


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes Hub API calls to the server's `HubStore`."""

    protocol_version = "HTTP/1.1"
    server: "_HubHTTPServer"

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args) -> None:
        """Quiet: requests are recorded in `LocalHub.requests` instead."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json", headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode())

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        body = self._body() if method in ("POST", "DELETE") else b""
        self.server.hub.requests.append((method, url.path))
        try:
            if method in ("POST", "DELETE") and not self.headers.get("Authorization", "").startswith("Bearer "):
                raise HubError(401, "Invalid credentials in Authorization header")
            self._route(method, parts, query, body)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            fields = dict(err.fields)
            if "url" in fields:  # the real Hub answers an existing repo's create with its url (the client reads it)
                fields["url"] = f"{self.server.hub.url}/{fields['url']}"
            self._send(err.status, json.dumps({"error": err.message, **fields}).encode(), headers=headers)
        except (KeyError, TypeError, ValueError) as err:  # a malformed request: answer it, keep serving
            self._send(400, json.dumps({"error": f"bad request: {err!r}"}).encode())

    # ------------------------------------------------------------------ routes
    def _route(self, method: str, parts: list[str], query: dict, body: bytes) -> None:
        store = self.server.hub.store
        if parts[:1] != ["api"]:
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(store.repo("/".join(parts[:2])), parts[3], "/".join(parts[4:]))
            raise HubError(404, f"no route for {method} /{'/'.join(parts)}")
        if parts == ["api", "whoami-v2"]:
            return self._json({"type": "user", "name": store.user, "auth": {"accessToken": {"role": "write"}}})
        if parts == ["api", "validate-yaml"] and method == "POST":
            return self._json({})
        if parts == ["api", "repos", "create"] and method == "POST":
            payload = json.loads(body or b"{}")
            repo_id = f"{payload.get('organization') or store.user}/{payload['name']}"
            store.create_repo(repo_id)
            return self._json({"url": f"{self.server.hub.url}/{repo_id}", "name": repo_id})
        if len(parts) >= 4 and parts[1] == "models":
            repo = store.repo("/".join(parts[2:4]))
            action, rest = (parts[4], parts[5:]) if len(parts) > 4 else ("revision", ["main"])
            handler = getattr(self, f"_{method.lower()}_{action.replace('-', '_')}", None)
            if handler is not None:
                with store.lock:
                    return handler(repo, rest, query, body)
        raise HubError(404, f"no route for {method} /{'/'.join(parts)}")

    def _get_revision(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        commit = repo.resolve("/".join(rest))
        self._json(
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "private": False,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _get_refs(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(repo.branches.items())]
        self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _get_commits(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        history = self.server.hub.store.history(repo, repo.resolve("/".join(rest)))
        self._json(
            [
                {"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": c.author}], "date": c.date}
                for c in history
            ]
        )

    def _post_preupload(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        if query.get("create_pr"):
            raise HubError(400, "the local hub does not support pull requests")
        files = repo.resolve("/".join(rest)).files
        answers = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
            for f in json.loads(body)["files"]
        ]
        self._json({"files": answers, "commitOid": repo.resolve("/".join(rest)).oid})

    def _post_commit(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        if query.get("create_pr"):
            raise HubError(400, "the local hub does not support pull requests")
        branch = "/".join(rest)
        header, added, deleted = {}, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(400, f"the local hub does not support commit operations of type {key!r}")
        commit = self.server.hub.store.commit(
            repo,
            branch,
            added,
            deleted,
            header.get("summary", ""),
            header.get("description", ""),
            header.get("parentCommit"),
        )
        url = f"{self.server.hub.url}/{repo.repo_id}/commit/{commit.oid}"
        self._json({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def _post_branch(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        name = "/".join(rest)
        if name in repo.branches:
            raise HubError(409, f"Branch {name} already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[name] = repo.resolve(start).oid
        self._json({})

    def _delete_branch(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        name = "/".join(rest)
        if name not in repo.branches or name == "main":
            raise HubError(404 if name != "main" else 403, f"cannot delete branch {name}", "RevisionNotFound")
        del repo.branches[name]
        self._json({})

    def _get_tree(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        commit = repo.resolve(rest[0])
        prefix = "/".join(rest[1:]).strip("/")
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        if prefix and not any(p.startswith(prefix + "/") for p in commit.files):
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        entries: dict[str, dict] = {}
        for path, blob in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            relative = path[len(prefix) + 1 :] if prefix else path
            if "/" in relative and not recursive:
                folder = f"{prefix}/{relative.split('/')[0]}" if prefix else relative.split("/")[0]
                entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "path": folder})
                continue
            entries[path] = self._file_entry(path, blob)
        self._json(list(entries.values()))

    def _post_paths_info(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        form = parse_qs(body.decode())
        files = repo.resolve("/".join(rest)).files
        paths = [p for p in form.get("paths", []) if p in files]
        self._json([self._file_entry(p, files[p]) for p in paths])

    def _file_entry(self, path: str, blob: str) -> dict:
        return {"type": "file", "oid": blob, "size": len(self.server.hub.store.blobs[blob]), "path": path}

    def _resolve(self, repo: Repo, revision: str, path: str) -> None:
        with self.server.hub.store.lock:
            commit = repo.resolve(revision)
            if path not in commit.files:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
            data = self.server.hub.store.blobs[commit.files[path]]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{commit.files[path]}"', "Accept-Ranges": "none"}
        self._send(200, data, "application/octet-stream", headers)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: "LocalHub"


class LocalHub:
    """A local Hub on 127.0.0.1 (random free port by default), served from a background thread.

    Use as a context manager or call `start()` / `stop()`; `url` is the endpoint to give the client
    (`HF_ENDPOINT`, or `memoryllm_hf.hub.hub_endpoint(url)` in a process that already imported it).
    """

    def __init__(self, port: int = 0, user: str = "tester"):
        self.store = HubStore(user)
        self.requests: list[tuple[str, str]] = []
        self._port = port
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the local hub is not running: call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        self._server = _HubHTTPServer(("127.0.0.1", self._port), HubRequestHandler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Server-side view of a revision: path -> bytes (for tests that check what really arrived)."""
        with self.store.lock:
            commit = self.store.repo(repo_id).resolve(revision)
            return {path: self.store.blobs[blob] for path, blob in commit.files.items()}

"""A small Hugging Face Hub on 127.0.0.1 for download tests: the real Hub is unreachable here.

It speaks the few endpoints huggingface_hub 2.x calls for ``model_info``,
``list_repo_tree``, ``snapshot_download``, ``hf_hub_download`` and
``get_safetensors_metadata``:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``?blobs=true``
  adds sizes, blob ids and LFS info to ``siblings``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (one page, recursive or not);
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files (``*.safetensors`` and anything
  over 1 MiB), ``Content-Length``, ``Accept-Ranges`` and ``Range`` (206);
- errors with the Hub's ``X-Error-Code`` header: ``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``, ``GatedRepo``.

Any folder can be served under any repo id (``add_repo``). Knobs for tests:
``throttle`` (bytes per second for file bodies), ``fail_after`` (drop the connection
once after that many body bytes), ``api_delay`` (seconds before each API answer),
``gated`` (repo ids that answer 401 GatedRepo), ``busy`` (statuses, such as 503, that the
next file GETs answer, one each, with ``Retry-After: 0``; ``busy_api`` the same for API
calls), ``corrupt_resumes`` (a body
sent for a ``Range`` from past byte 0 has its bytes inverted: the wrong bytes after a
resume) and ``requests`` (every request seen, to assert ``Range`` resumes).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_MIN_BYTES = 1 << 20
CHUNK = 64 * 1024


@dataclass
class HubFile:
    path: Path
    size: int
    oid: str  # git blob sha1: the ETag of a regular file
    sha256: str | None  # LFS files only: their ETag on the Hub

    @property
    def etag(self) -> str:
        return self.sha256 or self.oid


@dataclass
class HubRepo:
    repo_id: str
    commit: str
    revisions: set[str]
    files: dict[str, HubFile]


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class HubServer:
    """Start with ``HubServer().start()``; ``endpoint`` is what ``endpoint=`` takes."""

    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[SeenRequest] = field(default_factory=list)
    throttle: int | None = None  # body bytes per second
    fail_after: int | None = None  # drop the next longer body after this many bytes
    api_delay: float = 0.0  # a slow Hub: seconds before each /api/ answer
    gated: set[str] = field(default_factory=set)
    busy: list[int] = field(default_factory=list)  # statuses for the next file GETs
    busy_api: list[int] = field(default_factory=list)  # statuses for the next API GETs
    corrupt_resumes: bool = False  # invert the bytes of bodies that resume past byte 0
    _httpd: ThreadingHTTPServer | None = None
    _connections: set[socket.socket] = field(default_factory=set)

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def close(self) -> None:
        """Stop serving and drop open keep-alive connections: the Hub is gone."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._connections.clear()

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add_repo(
        self, repo_id: str, folder: str | Path, revisions: tuple[str, ...] = ("main",)
    ) -> str:
        """Serve every file under ``folder`` as ``repo_id``; returns the commit sha."""
        folder = Path(folder)
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            lfs = path.suffix == ".safetensors" or len(data) > LFS_MIN_BYTES
            sha256 = hashlib.sha256(data).hexdigest() if lfs else None
            files[path.relative_to(folder).as_posix()] = HubFile(path, len(data), oid, sha256)
        commit = hashlib.sha1(
            repo_id.encode() + b"".join(f.etag.encode() for f in files.values())
        ).hexdigest()
        self.repos[repo_id] = HubRepo(repo_id, commit, set(revisions), files)
        return commit

    def seen(self, method: str | None = None, contains: str = "") -> list[SeenRequest]:
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and contains in r.path
        ]


RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)"
    r"(?:/revision/(?P<rev>[^/]+)|/tree/(?P<tree>[^/]+)(?:/(?P<sub>.*))?)?$"
)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.hub._connections.add(self.connection)

    def finish(self) -> None:
        self.hub._connections.discard(self.connection)
        super().finish()

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.requests.append(SeenRequest(self.command, path, dict(self.headers.items())))
        if m := RESOLVE.match(path):
            repo = self._repo(m["repo"], m["rev"])
            if repo is not None:
                self._file(repo, m["file"], head)
            return
        if path.startswith("/api/") and self.hub.api_delay:
            time.sleep(self.hub.api_delay)
        if path.startswith("/api/") and self.hub.busy_api and not head:
            status = self.hub.busy_api.pop(0)
            self._error(status, "", "The Hub is busy: try again later.", retry_after=0)
            return
        if (m := API.match(path)) and not head:
            rev = m["rev"] or m["tree"] or "main"
            repo = self._repo(m["repo"], rev)
            if repo is None:
                return
            if m["tree"] is not None:
                self._tree(repo, m["sub"] or "", parse_qs(url.query))
            else:
                self._info(repo, parse_qs(url.query))
            return
        self._error(404, "", f"{path} is not an endpoint of this test Hub")

    def _repo(self, repo_id: str, rev: str) -> HubRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        if repo_id in self.hub.gated:
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
            return None
        if rev != repo.commit and rev not in repo.revisions:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo

    def _info(self, repo: HubRepo, query: dict) -> None:
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name, f in repo.files.items():
            entry: dict = {"rfilename": name}
            if blobs:
                entry |= {"size": f.size, "blobId": f.oid}
                if f.sha256:
                    entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(entry)
        self._json(
            {
                "_id": repo.commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["mlx", "safetensors"],
                "library_name": "mlx",
                "siblings": siblings,
            },
            repo,
        )

    def _tree(self, repo: HubRepo, sub: str, query: dict) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries, folders = [], set()
        for name, f in repo.files.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry = {"type": "file", "oid": f.oid, "size": f.size, "path": name}
            if f.sha256:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        if recursive:
            for name in repo.files:
                parts = name[len(prefix) :].split("/")[:-1]
                folders |= {prefix + "/".join(parts[: i + 1]) for i in range(len(parts))}
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in folders]
        self._json(entries, repo)

    def _file(self, repo: HubRepo, name: str, head: bool) -> None:
        f = repo.files.get(name)
        if f is None:
            self._error(404, "EntryNotFound", f"{name} does not exist on this revision", repo)
            return
        if self.hub.busy and not head:
            status = self.hub.busy.pop(0)
            self._error(status, "", "The Hub is busy: try again later.", repo, retry_after=0)
            return
        start, end = 0, f.size - 1
        status = 200
        if (rng := self.headers.get("Range")) and not head:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m is None or (m[1] and int(m[1]) >= f.size):
                self._error(416, "", f"Range not satisfiable: {rng}", repo)
                return
            start = int(m[1] or 0)
            end = min(int(m[2]), f.size - 1) if m[2] else f.size - 1
            status = 206
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{f.oid}"')
        if f.sha256:
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(f.size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
        self.end_headers()
        if head:
            return
        self._body(f.path, start, end + 1, corrupt=self.hub.corrupt_resumes and start > 0)

    def _body(self, path: Path, start: int, stop: int, corrupt: bool = False) -> None:
        fail_after = self.hub.fail_after
        if fail_after is not None and stop - start > fail_after:
            self.hub.fail_after = None  # once: the retry gets the rest
        else:
            fail_after = None
        sent = 0
        began = time.monotonic()
        try:
            with open(path, "rb") as fh:
                fh.seek(start)
                while start + sent < stop:
                    chunk = fh.read(min(CHUNK, stop - start - sent))
                    if corrupt:
                        chunk = bytes(b ^ 0xFF for b in chunk)
                    if fail_after is not None and sent + len(chunk) > fail_after:
                        self.wfile.write(chunk[: fail_after - sent])
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if self.hub.throttle:
                        ahead = sent / self.hub.throttle - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _json(self, data: object, repo: HubRepo | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if repo is not None:
            self.send_header("X-Repo-Commit", repo.commit)
        self.end_headers()
        self.wfile.write(body)

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        repo: HubRepo | None = None,
        retry_after: int | None = None,
    ) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if repo is not None:
            self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def free_port_endpoint() -> str:
    """An endpoint where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"

"""A small local Hugging Face Hub, for tests that pull without the internet.

It implements the part of the Hub API that ``huggingface_hub`` 2.4.0 uses to download a
model (``model_info``, ``list_repo_tree``, ``hf_hub_download``, ``snapshot_download``, and
``router.hub``), answering as the real Hub does, including its errors: the status *and* the
``X-Error-Code`` / ``X-Error-Message`` headers, because the library picks its exception class
from the header (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound).

- ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes, blob ids, LFS sha256)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``?recursive=true``)
- ``HEAD|GET /{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag`` (the sha256 for
  LFS files, the git blob id otherwise, as the library names its blobs), ``Content-Length`` and
  ``Range`` (206). No ``X-Xet-*`` headers, so downloads take the plain HTTP path.

Faults for resume and error tests: `drop` (send N bytes of a file, then cut the connection),
`fail` (answer a status for the next GETs of a file), `delay` (serve a file slowly). Every
byte range actually sent is recorded per file in `served`, so a test can prove that no byte
was downloaded twice.

Usage::

    with FakeHub() as hub:
        hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": data})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".h5", ".onnx", ".msgpack")
CHUNK = 64 * 1024


def git_blob_id(data: bytes) -> str:
    """Git's object id for a blob: what the Hub calls `oid` / `blobId`, and the ETag of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def blob_id(self) -> str:
        return git_blob_id(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, FakeFile]
    sha: str
    revisions: dict[str, str]
    gated: bool = False
    tokens: set[str] = field(default_factory=set)
    """Tokens that may read a gated repo."""


@dataclass
class _Fault:
    kind: str  # "drop" | "fail"
    value: int
    times: int


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 (random port) serving fake repos. Use as a context manager."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.served: dict[str, list[tuple[int, int]]] = defaultdict(list)
        """``"{repo}/{file}"`` → ``[(start, end), ...]``: the body bytes really sent, end exclusive."""
        self.requests: list[tuple[str, str]] = []
        self._faults: dict[str, list[_Fault]] = defaultdict(list)
        self._delay: dict[str, float] = {}
        self._lock = threading.Lock()
        self._sending = 0
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fakehub", daemon=True
        )

    # -- lifecycle --

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- content --

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        gated: bool = False,
        tokens: set[str] | None = None,
        revisions: Iterable[str] = (),
    ) -> FakeRepo:
        """Serve `files` as `repo_id` (replacing any earlier content); its commit hash follows from
        the content. `revisions` names extra branches/tags at that commit (``main`` always is)."""
        ff = {p: FakeFile(d, p.endswith(LFS_SUFFIXES)) for p, d in files.items()}
        sha = hashlib.sha1("".join(f"{p}\0{f.blob_id}\n" for p, f in sorted(ff.items())).encode()).hexdigest()
        names = {"main": sha}
        for name in revisions:
            names[name] = sha
        repo = FakeRepo(repo_id, ff, sha, names, gated, set(tokens or ()))
        self.repos[repo_id] = repo
        return repo

    # -- faults --

    def drop(self, repo_file: str, after: int, times: int = 1) -> None:
        """The next `times` GETs of ``"{repo}/{file}"`` send `after` body bytes, then cut the connection."""
        self._faults[repo_file].append(_Fault("drop", after, times))

    def fail(self, repo_file: str, status: int = 503, times: int = 1) -> None:
        """The next `times` GETs of ``"{repo}/{file}"`` get `status` instead of content."""
        self._faults[repo_file].append(_Fault("fail", status, times))

    def delay(self, repo_file: str, seconds_per_chunk: float) -> None:
        """Serve ``"{repo}/{file}"`` slowly (a pause per 64 KiB), so a test can act mid-download."""
        self._delay[repo_file] = seconds_per_chunk

    def _take_fault(self, key: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get(key) or []
            while queue and queue[0].times <= 0:
                queue.pop(0)
            if not queue:
                return None
            queue[0].times -= 1
            return queue[0]

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no file body is being sent: a response to a client that went away is only
        recorded in `served` once the server notices."""
        deadline = time.monotonic() + timeout
        while self._sending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self._sending, f"fake hub still sending after {timeout} s"

    def bytes_served(self, repo_file: str) -> int:
        return sum(e - s for s, e in self.served.get(repo_file, []))

    def overlaps(self, repo_file: str) -> int:
        """Bytes of `repo_file` that were sent more than once."""
        total = self.bytes_served(repo_file)
        union, cur_s, cur_e = 0, -1, -1
        for s, e in sorted(self.served.get(repo_file, [])):
            if s > cur_e:
                union += max(0, cur_e - cur_s)
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        union += max(0, cur_e - cur_s)
        return total - union


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- helpers --

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _error(self, status: int, code: str | None, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _repo(self, repo_id: str) -> FakeRepo | None:
        """The repo, or None after answering as the Hub does: 401 anonymously, 404 with a token."""
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404 if self._token() else 401, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: FakeRepo, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in repo.revisions:
            return repo.revisions[rev]
        if rev == repo.sha:
            return rev
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    def _split_repo(self, parts: list[str], marker: str) -> tuple[str, list[str]] | None:
        """``[org, name, marker, ...rest]`` or ``[name, marker, ...rest]`` → (repo id, rest)."""
        for n in (2, 1):
            if len(parts) > n and parts[n] == marker:
                return "/".join(parts[:n]), parts[n + 1 :]
        return None

    # -- routes --

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        self.fake.requests.append((self.command, url.path))
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if parts[:2] == ["api", "models"] and self.command == "GET":
            rest = parts[2:]
            if (hit := self._split_repo(rest, "revision")) is not None:
                return self._model_info(hit[0], "/".join(hit[1]), query)
            if (hit := self._split_repo(rest, "tree")) is not None:
                return self._tree(hit[0], hit[1], query)
            return self._model_info("/".join(rest), "main", query)
        if (hit := self._split_repo(parts, "resolve")) is not None and len(hit[1]) >= 2:
            return self._resolve(hit[0], hit[1][0], "/".join(hit[1][1:]))
        self._error(404, None, "Not Found")

    def _model_info(self, repo_id: str, rev: str, query: dict[str, str]) -> None:
        repo = self._repo(repo_id)
        if repo is None or (commit := self._commit(repo, rev)) is None:
            return
        blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, f in sorted(repo.files.items()):
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s.update(size=len(f.data), blobId=f.blob_id)
                if f.lfs:
                    s["lfs"] = {"size": len(f.data), "sha256": f.sha256, "pointerSize": len(f.pointer)}
            siblings.append(s)
        self._json(
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "lastModified": "2025-01-01T00:00:00.000Z",
                "tags": [],
                "siblings": siblings,
            }
        )

    def _tree(self, repo_id: str, rest: list[str], query: dict[str, str]) -> None:
        repo = self._repo(repo_id)
        if repo is None or not rest or self._commit(repo, rest[0]) is None:
            return
        prefix = "/".join(rest[1:]).strip("/")
        recursive = query.get("recursive", "").lower() in ("1", "true")
        items: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for path, f in sorted(repo.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1 :] if prefix else path
            if not recursive and "/" in rel:
                dirs.add((prefix + "/" if prefix else "") + rel.split("/", 1)[0])
                continue
            item: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": path}
            if f.lfs:
                item["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
            items.append(item)
        items += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        self._json(items)

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id)
        if repo is None or (commit := self._commit(repo, rev)) is None:
            return
        if repo.gated and self._token() not in repo.tokens:
            if self._token() is None:
                msg = (
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                    "to access it. Please log in."
                )
                return self._error(401, "GatedRepo", msg)
            msg = (
                f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self.fake.url}/{repo_id} to ask for access."
            )
            return self._error(403, "GatedRepo", msg)
        f = repo.files.get(path)
        if f is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        key = f"{repo_id}/{path}"
        size = len(f.data)
        start, end = 0, size  # end exclusive
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a) if a else max(0, size - int(b))
            end = min(size, int(b) + 1) if a and b else size
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        fault = self.fake._take_fault(key) if self.command == "GET" else None
        if fault is not None and fault.kind == "fail":
            return self._error(fault.value, None, f"Service unavailable ({fault.value})")
        self.send_response(206 if rng else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{f.etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = end if fault is None else min(end, start + fault.value)
        pos = start
        delay = self.fake._delay.get(key, 0.0)
        with self.fake._lock:
            self.fake._sending += 1
        try:
            while pos < limit:
                n = min(CHUNK, limit - pos)
                self.wfile.write(f.data[pos : pos + n])
                self.wfile.flush()
                pos += n
                if delay:
                    time.sleep(delay)
        except OSError:  # the client went away
            self.close_connection = True
        finally:
            self.fake.served[key].append((start, pos))
            with self.fake._lock:
                self.fake._sending -= 1
        if fault is not None and fault.kind == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

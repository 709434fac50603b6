"""A stand-in for the Hugging Face Hub, which cannot be reached here: the HTTP routes that
huggingface_hub's `snapshot_download` uses (repository info, file tree, file metadata and
download, with ranges), serving repositories from local folders. A file can be held part-way
through its download, as a large file on a slow link is, until the test lets it go.
"""

import hashlib
import json
import re
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil

_REPO_INFO = re.compile(r"^/api/models/(?P<repo>.+)/revision/(?P<revision>[^/]+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>.+)/tree/(?P<revision>[^/]+)(?P<folder>/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>.+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")
_CHUNK = 64 * 1024


@dataclass
class FakeHub:
    repos: dict[str, Path]
    hold: str | None = None  # a file name whose download stops after its first chunk
    token: str | None = None  # a gated repository: every request must carry this token
    url: str = ""
    served: list[str] = field(default_factory=list)  # "GET /path" per request
    held: threading.Event = field(default_factory=threading.Event)  # the hold was reached
    release: threading.Event = field(default_factory=threading.Event)  # lets the hold go
    dropped: threading.Event = field(default_factory=threading.Event)  # the client went away

    def files(self, repo: str) -> list[Path]:
        return sorted(p for p in self.repos[repo].iterdir() if p.is_file())

    def commit(self, repo: str) -> str:
        names = [p.name for p in self.files(repo)]
        return hashlib.sha1(json.dumps([repo, names]).encode()).hexdigest()

    @contextmanager
    def running(self) -> Iterator["FakeHub"]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield self
        finally:
            self.release.set()
            server.shutdown()
            server.server_close()


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            return None

        def do_GET(self) -> None:
            self._route(body=True)

        def do_HEAD(self) -> None:
            self._route(body=False)

        def _route(self, *, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            hub.served.append(f"{self.command} {path}")
            if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._json(401, {"error": "Access to this model is restricted"}, "GatedRepo")
                return
            for pattern, answer in (
                (_REPO_INFO, self._repo_info),
                (_TREE, self._tree),
                (_RESOLVE, self._file),
            ):
                if (found := pattern.match(path)) is not None:
                    repo = found["repo"]
                    if repo not in hub.repos:
                        self._json(404, {"error": "Repository not found"}, "RepoNotFound")
                        return
                    answer(repo, found, body)
                    return
            self._json(404, {"error": "not found"}, "EntryNotFound")

        def _json(self, status: int, payload: Any, error_code: str | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if error_code:
                self.send_header("X-Error-Code", error_code)
            self.end_headers()
            self.wfile.write(data)

        def _repo_info(self, repo: str, found: re.Match[str], body: bool) -> None:
            siblings = [{"rfilename": p.name} for p in hub.files(repo)]
            info = {"id": repo, "modelId": repo, "sha": hub.commit(repo), "private": False}
            self._json(200, info | {"siblings": siblings, "tags": [], "downloads": 0})

        def _tree(self, repo: str, found: re.Match[str], body: bool) -> None:
            entries = [
                {"type": "file", "oid": _etag(p)[:40], "size": p.stat().st_size, "path": p.name}
                for p in hub.files(repo)
            ]
            self._json(200, entries if not (found["folder"] or "").strip("/") else [])

        def _file(self, repo: str, found: re.Match[str], body: bool) -> None:
            file = hub.repos[repo] / found["file"]
            if not file.is_file():
                self._json(404, {"error": "Entry not found"}, "EntryNotFound")
                return
            data = file.read_bytes()
            start = 0
            if ranged := re.match(r"bytes=(\d+)-", self.headers.get("Range", "")):
                start = int(ranged[1])
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", f'"{_etag(file)}"')
            self.send_header("X-Repo-Commit", hub.commit(repo))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if body:
                self._send(file.name, data[start:])

        def _send(self, name: str, data: bytes) -> None:
            try:
                for offset in range(0, len(data), _CHUNK):
                    self.wfile.write(data[offset : offset + _CHUNK])
                    self.wfile.flush()
                    if name == hub.hold and offset == 0:
                        hub.held.set()
                        while not hub.release.wait(0.05):
                            if _peer_closed(self):
                                raise ConnectionResetError
            except (BrokenPipeError, ConnectionResetError):
                hub.dropped.set()
                self.close_connection = True

    return Handler


def _peer_closed(handler: BaseHTTPRequestHandler) -> bool:
    """Whether the client has closed its end (a killed downloader): readable, with nothing
    to read."""
    readable, _, _ = select.select([handler.connection], [], [], 0)
    return bool(readable) and handler.connection.recv(1, socket.MSG_PEEK) == b""


def download_processes(hub: "FakeHub") -> list[psutil.Process]:
    """The living `python -m worker.hub` processes (a worker's downloads) that fetch from `hub`:
    its address in their environment tells them from another test session's."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        alive = process.info["status"] != psutil.STATUS_ZOMBIE
        if not alive or "worker.hub" not in (process.info["cmdline"] or []):
            continue
        try:
            if process.environ().get("HF_ENDPOINT") == hub.url:
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return found

"""A small stand-in for the Hugging Face Hub over loopback, for the real ``huggingface_hub`` client
(``HF_ENDPOINT=http://127.0.0.1:PORT``): repo info, the file tree, file downloads with HEAD and byte ranges,
revisions (branch name or commit) and private repos that need a token. It records every request and the
bytes it served per file, so a test can tell a header read from a download."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    revisions: dict[str, dict[str, bytes]]  # revision name (branch) -> {path: content}
    token: str | None = None  # needed as "Bearer TOKEN" when set

    def commit(self, revision: str) -> str:
        return hashlib.sha1(f"{revision}".encode()).hexdigest()

    def files_at(self, revision: str) -> dict[str, bytes] | None:
        if revision in self.revisions:
            return self.revisions[revision]
        for name in self.revisions:
            if self.commit(name) == revision:
                return self.revisions[name]
        return None

    def commit_of(self, revision: str) -> str:
        return revision if revision not in self.revisions else self.commit(revision)


def repo_from_dir(folder: Path, **extra_revisions: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """``{"main": {name: bytes}}`` from a directory, plus revisions given as the main files with changes."""
    main = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    out = {"main": main}
    for name, changes in extra_revisions.items():
        out[name] = {**main, **changes}
    return out


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, range
    served: dict[str, int] = field(default_factory=dict)  # file name -> bytes sent
    tokens_seen: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

            def do_GET(self) -> None:
                hub._answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _send_json(self, h: BaseHTTPRequestHandler, status: int, obj, head: bool = False,
                   code: str | None = None) -> None:
        body = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        if status >= 400:
            h.send_header("X-Error-Message", obj.get("error", "") if isinstance(obj, dict) else "")
        if code:  # as the hub does: the client maps it to RepositoryNotFoundError, RevisionNotFoundError...
            h.send_header("X-Error-Code", code)
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _repo(self, h: BaseHTTPRequestHandler, repo_id: str, head: bool) -> Repo | None:
        repo = self.repos.get(repo_id)
        auth = h.headers.get("Authorization")
        self.tokens_seen.append(auth)
        if repo is None:
            self._send_json(h, 404, {"error": "Repository not found"}, head, "RepoNotFound")
            h.close_connection = True
            return None
        if repo.token is not None and auth != f"Bearer {repo.token}":
            self._send_json(h, 401, {"error": "Invalid username or password."}, head, "RepoNotFound")
            return None
        return repo

    ROUTES = (("info", r"/api/models/([^/]+/[^/]+)/revision/([^/]+)"),
              ("tree", r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?"),
              ("file", r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)"))

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        for route, pattern in self.ROUTES:
            m = re.fullmatch(pattern, path)
            if m:
                break
        else:
            return self._send_json(h, 404, {"error": f"no route {path}"}, head)
        repo = self._repo(h, m[1], head)
        if repo is None:
            return
        files = repo.files_at(m[2])
        if files is None:
            return self._send_json(h, 404, {"error": f"Invalid rev id: {m[2]}"}, head, "RevisionNotFound")
        if route == "info":
            return self._send_json(h, 200, {"id": m[1], "modelId": m[1], "sha": repo.commit_of(m[2]), "private": False,
                                            "siblings": [{"rfilename": n} for n in files]}, head)
        if route == "tree":
            return self._send_json(h, 200, [{"type": "file", "path": n, "size": len(b),
                                             "oid": hashlib.sha1(b).hexdigest()} for n, b in files.items()], head)
        if m[3] not in files:
            return self._send_json(h, 404, {"error": f"{m[3]} not found"}, head, "EntryNotFound")
        self._send_file(h, files[m[3]], m[3], repo.commit_of(m[2]), head)

    def _send_file(self, h: BaseHTTPRequestHandler, data: bytes, name: str, commit: str, head: bool) -> None:
        start, end = 0, len(data) - 1
        rng = h.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start, end = int(a or 0), min(int(b) if b else len(data) - 1, len(data) - 1)
        part = data[start:end + 1]
        h.send_response(206 if rng else 200)
        h.send_header("Content-Length", str(len(part)))
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", commit)
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if not head:
            h.wfile.write(part)
            self.served[name] = self.served.get(name, 0) + len(part)

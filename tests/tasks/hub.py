"""A small Hugging Face hub on loopback: serves local folders as model repos the way huggingface_hub asks for them.

huggingface_hub resolves a revision with GET /api/models/{repo_id}[/revision/{revision}] (JSON: sha,
siblings) and fetches each file with HEAD then GET /{repo_id}/resolve/{commit}/{filename}, reading
X-Repo-Commit, ETag and Content-Length. Errors carry X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound), which it turns into its own exception types.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


@dataclass
class Repo:
    revisions: dict[str, Path]  # branch or tag -> folder; each folder is one commit

    def commit(self, folder: Path) -> str:
        h = hashlib.sha1()
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
        return h.hexdigest()  # 40 hex digits, like a git commit

    def find(self, revision: str) -> tuple[str, Path] | None:
        if revision in self.revisions:
            folder = self.revisions[revision]
            return self.commit(folder), folder
        for folder in self.revisions.values():
            if self.commit(folder) == revision:
                return revision, folder
        return None


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    fail_next: int = 0  # answer this many coming requests with 503, as a hub under load does
    requests: list[str] = field(default_factory=list)

    def add(self, repo_id: str, **revisions: Path) -> None:
        self.repos[repo_id] = Repo(dict(revisions))

    def __enter__(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _error(self, status: int, code: str) -> None:
                body = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _route(self) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                if hub.fail_next > 0:
                    hub.fail_next -= 1
                    return self._error(503, "ServiceUnavailable")
                parts = [unquote(p) for p in self.path.split("?")[0].strip("/").split("/")]
                if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[-2] == "revision":
                    return self._info("/".join(parts[2:-2]), parts[-1])
                if parts[:2] == ["api", "models"] and len(parts) >= 3:  # no revision: the default branch
                    return self._info("/".join(parts[2:]), "main")
                if len(parts) >= 5 and "resolve" in parts:
                    i = parts.index("resolve")
                    return self._file("/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2 :]))
                self._error(404, "RepoNotFound")

            def _lookup(self, repo_id: str, revision: str) -> tuple[str, Path] | None:
                """The commit and folder of a repo at a revision, or None after answering 404 as the hub does."""
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound")
                    return None
                found = repo.find(revision)
                if found is None:
                    self._error(404, "RevisionNotFound")
                return found

            def _info(self, repo_id: str, revision: str) -> None:
                if (found := self._lookup(repo_id, revision)) is None:
                    return None
                sha, folder = found
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                body = json.dumps(
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": sha,
                        "private": False,
                        "siblings": [{"rfilename": f} for f in files],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, repo_id: str, revision: str, filename: str) -> None:
                if (found := self._lookup(repo_id, revision)) is None:
                    return None
                sha, folder = found
                path = folder / filename
                if not path.is_file() or folder.resolve() not in path.resolve().parents:
                    return self._error(404, "EntryNotFound")
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", sha)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            do_GET = do_HEAD = _route

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

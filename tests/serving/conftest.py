"""Serving fixtures: real `python -m serving` processes on loopback, over copies of the demo repository."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import modelrepo
from tests.support import SERVER_LOGS, DemoRepository

ROOT = Path(__file__).resolve().parents[2]
# Where the browser tests (test_page.py) put their screenshots: said at the end of the run. (Fixture and
# hook share this module's key: test modules import this file under another name, as another module.)
_SCREENSHOTS = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    folder = tmp_path_factory.mktemp("page-screenshots")
    pytestconfig.stash[_SCREENSHOTS] = folder
    return folder


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if _SCREENSHOTS in config.stash:
        terminalreporter.write_line(f"compare page screenshots: {config.stash[_SCREENSHOTS]}")


@dataclass
class Server:
    url: str
    repository: Path
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **kwargs})  # type: ignore[arg-type]

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator:
    """Start servers on demand; all are stopped at the end of the session."""
    started: list[Server] = []
    logs = pytestconfig.stash.setdefault(SERVER_LOGS, [])

    def start(repository: Path, *args: str, env: dict[str, str] | None = None) -> Server:
        port = free_port()
        log = tmp_path_factory.mktemp("server-log") / "server.log"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "serving", "--repository", str(repository), "--port", str(port),
                 "--poll-interval", "0.5", *args],
                cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
            )
        server = Server(f"http://127.0.0.1:{port}", repository, proc, log)
        started.append(server)
        logs.append(log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.logs()}")
            try:
                if httpx.get(f"{server.url}/v2/health/ready", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not get ready in 120 s:\n{server.logs()}")

    yield start
    for s in started:
        s.process.terminate()
    for s in started:
        try:
            s.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            s.process.kill()


@pytest.fixture(scope="session")
def served_repository(demo_repository: DemoRepository, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the demo repository for the shared server (tests that publish use their own)."""
    return demo_repository.copy_to(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="session")
def server(start_server, served_repository: Path) -> Server:
    """The shared server: base_model and merged_model, no API key."""
    return start_server(served_repository)


def version_source(repository: Path, name: str, dest: Path) -> Path:
    """A publishable copy of the live version of `name` (its folder minus what publish writes itself)."""
    entry = modelrepo.read_index(repository).entries[name]
    shutil.copytree(repository / entry.path, dest)
    for generated in ("manifest.json", "graph.pbtxt"):
        (dest / generated).unlink(missing_ok=True)
    return dest

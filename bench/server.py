"""Repositories for the benchmarks and the serving process over them (python -m serving, as a user runs it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

import modelrepo

READY = "/v2/health/ready"


def publish(repository: Path, name: str, folder: Path, *, kind: str = "merged", base: str | None = None,
            alpha: float | None = None, generation: dict[str, Any] | None = None,
            stage: bool = False) -> modelrepo.Entry:
    """Publish `folder` as the next version of `name` (`stage`: staged); `generation` overrides
    generation_config.json fields.

    The override goes through a folder of symlinks (publish_version copies the files they point to),
    so a 270 MB IR is not copied twice.
    """
    manifest = {"built_by": "bench", "source": str(folder)}
    if generation is None:
        return modelrepo.publish_version(  # type: ignore[arg-type]
            repository, name, kind, folder, manifest, base=base, alpha=alpha, stage=stage
        )
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
        staged = Path(tmp) / "model"
        staged.mkdir()
        for f in folder.iterdir():
            if f.name != "generation_config.json":
                (staged / f.name).symlink_to(f.resolve())
        body = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
        (staged / "generation_config.json").write_text(json.dumps(body | generation, indent=2), encoding="utf-8")
        return modelrepo.publish_version(  # type: ignore[arg-type]
            repository, name, kind, staged, manifest, base=base, alpha=alpha, stage=stage
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen[bytes], sig: int, timeout: float = 30) -> None:
    """Ask a server process to stop with `sig`; kill it if it has not within `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server:
    """`python -m serving` on a free port, as a child process; a context manager that waits until ready."""

    def __init__(
        self, repository: Path, log_path: Path, poll_interval: float = 2.0, log_level: str = "warning"
    ) -> None:
        self.repository = repository
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.poll_interval = poll_interval
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def __enter__(self) -> Server:
        env = dict(os.environ)
        env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "serving", "--repository", str(self.repository), "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", self.log_level, "--poll-interval", str(self.poll_interval)]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(t0)
        except BaseException:  # a server that started must not outlive a failed start (it would load and poll on)
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None
        deadline = t0 + 300
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting; see {self.log_path}")
            try:
                if httpx.get(self.url + READY, timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    self.prime()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready within 300 s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGINT)
        self._log.close()

    def prime(self) -> None:
        """One request on its own before any concurrent ones.

        Works around a deadlock in the server (openvino 2026.4's Python bindings): the first
        `Tensor.data` runs pybind11's once-only numpy setup, which takes the GIL inside a
        `call_once`; two handler threads reaching it together (the first two concurrent requests
        of a fresh server) each wait for what the other holds, and the server hangs for good.
        """
        models = httpx.get(self.url + "/v3/models", timeout=30).json()["data"]
        body = {"model": models[0]["id"], "prompt": "def", "max_tokens": 1}
        response = httpx.post(self.url + "/v3/completions", json=body, timeout=120)
        response.raise_for_status()

    def ready(self) -> dict[str, Any]:
        return httpx.get(self.url + READY, timeout=5).json()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

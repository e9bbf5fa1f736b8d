"""Hardening fixtures: the serving engineer's server fixtures, reused, and helpers every hardening test shares."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx

# Reused, not rewritten: pytest registers fixtures imported into a conftest.
from tests.serving.conftest import ROOT, Server, free_port, served_repository, server, start_server, version_source

__all__ = [
    "ROOT",
    "Server",
    "assert_openai_error",
    "free_port",
    "greedy",
    "ready_models",
    "served_repository",
    "server",
    "start_server",
    "tree_digest",
    "version_source",
]

ERROR_KEYS = {"message", "type", "param", "code"}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is `status` with OpenAI's error body and nothing else; returns the error object."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert "Traceback" not in error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def ready_models(server: Server) -> dict[str, int]:
    """The served names and live versions, as readiness reports them."""
    r = httpx.get(f"{server.url}/v2/health/ready", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["models"]


def greedy(server: Server, model: str, prompt: str, max_tokens: int = 24, **headers: str) -> str:
    """A greedy completion's text (the served answer a fault must not change)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(f"{server.url}/v3/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below `root` (the lock file aside), to show a repository did not change."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }

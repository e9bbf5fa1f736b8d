"""Concurrency, cancellation, the bounded queue and the API key, on real server processes."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from demo.make_sources import DemoSources
from tests.serving.conftest import Server
from tests.support import metric, prompt_texts

pytestmark = pytest.mark.slow

API_KEY = "test-key-4f1c9a"


def test_16_concurrent_greedy_requests_match_the_same_requests_one_by_one(
    server: Server, demo_sources: DemoSources
) -> None:
    prompts = prompt_texts(demo_sources.sql_prompts, demo_sources.spell_prompts)[:8]
    assert len(prompts) == 8
    jobs = [(model, prompt) for prompt in prompts for model in ("merged_model", "base_model")]
    assert len(jobs) == 16

    def ask(job: tuple[str, str]) -> str:
        model, prompt = job
        with server.client() as http:
            body = {"model": model, "prompt": prompt, "max_tokens": 40, "temperature": 0}
            r = http.post("/v3/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    one_by_one = [ask(j) for j in jobs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, jobs))
    assert together == one_by_one
    assert sum("SELECT" in t for t in one_by_one[0:12:2]) >= 5  # the merged model writes SQL for SQL prompts


def test_a_client_that_disconnects_cancels_its_request(server: Server) -> None:
    before = metric(server.url, "lora_serve_cancelled_requests_total", "base_model", API_KEY)
    body = {"model": "base_model", "prompt": "The city", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with server.client() as http, http.stream("POST", "/v3/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # non-streaming: a raw connection, closed once the engine runs the request (1000 tokens take far longer)
    payload = json.dumps({**body, "stream": False}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v3/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        deadline = time.monotonic() + 30
        while metric(server.url, "lora_serve_running_requests", "base_model", API_KEY) < 1:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    deadline = time.monotonic() + 30
    while metric(server.url, "lora_serve_cancelled_requests_total", "base_model", API_KEY) < before + 2:
        assert time.monotonic() < deadline, "the disconnected requests were not cancelled"
        time.sleep(0.05)
    while metric(server.url, "lora_serve_queue_depth", "base_model", API_KEY) != 0:
        assert time.monotonic() < deadline, "the engine still holds requests"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def strict_server(start_server, served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """A server with an API key and a queue of 2 requests per model."""
    key = tmp_path_factory.mktemp("key") / "api-key"
    key.write_text(API_KEY + "\n")
    return start_server(served_repository, "--api-key-file", str(key), "--max-queue", "2")


def test_the_api_key_is_required_on_v1_and_v3_but_not_on_health(strict_server: Server) -> None:
    body = {"model": "base_model", "prompt": "x", "max_tokens": 2}
    with strict_server.client() as http:
        for path in ("/v3/completions", "/v1/completions"):
            r = http.post(path, json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = http.post("/v3/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert http.get("/v3/models").status_code == 401
        assert http.get("/v1/config").status_code == 401
        ok = http.post("/v3/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200, ok.text
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/health/ready").status_code == 200
    assert API_KEY not in strict_server.logs()


def test_a_full_queue_answers_503_with_retry_after(strict_server: Server) -> None:
    body = {"model": "base_model", "prompt": "The city", "max_tokens": 1000, "ignore_eos": True}

    def ask(_: int) -> httpx.Response:
        with strict_server.client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            return http.post("/v3/completions", json=body)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    statuses = sorted(r.status_code for r in answers)
    assert 200 in statuses and 503 in statuses, statuses
    assert set(statuses) == {200, 503}
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["code"] == "overloaded"
    # the queue drains and the model serves again
    assert ask(0).status_code == 200

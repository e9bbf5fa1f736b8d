"""The HTTP layer alone, on a fast fake engine: not-ready answers, engine failures, errors in mid-stream."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from serving.app import Settings, create_app
from tests.serving.fake_engine import FakeEngine, fake_repository


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return fake_repository(tmp_path)


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture
def client(repository: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(repository), loader=FakeEngine)) as c:
        _wait_ready(c)
        yield c


def test_completion_and_chat_on_the_fake_engine(client: TestClient) -> None:
    r = client.post("/v3/completions", json={"model": "fake", "prompt": "a bb ccc"})
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["text"] == "ok ok"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    r = client.post("/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["choices"][0]["message"] == {"content": "ok ok", "role": "assistant"}


def test_an_engine_failure_is_a_500_in_openai_shape_without_a_trace(client: TestClient) -> None:
    r = client.post("/v3/completions", json={"model": "fake", "prompt": "please explode"})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error" and "device was lost" in r.json()["error"]["message"]
    assert "Traceback" not in r.text


def test_an_error_in_mid_stream_is_an_error_frame_then_done(client: TestClient) -> None:
    r = client.post("/v3/completions", json={"model": "fake", "prompt": "please explode", "stream": True})
    assert r.status_code == 200
    frames = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(frames[0])["choices"][0]["text"] == "ok"
    assert json.loads(frames[-2])["error"]["code"] == "engine_error"
    assert frames[-1] == "[DONE]"


def test_the_prompt_may_not_fill_the_context(client: TestClient) -> None:
    r = client.post("/v3/completions", json={"model": "fake", "prompt": "w " * 64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_while_models_load_the_server_answers_503_not_ready(repository: Path) -> None:
    gate = threading.Event()

    def slow_loader(*args: object) -> FakeEngine:
        gate.wait(10)
        return FakeEngine(*args)  # type: ignore[arg-type]

    with TestClient(create_app(Settings(repository), loader=slow_loader)) as c:
        try:
            for r in (c.get("/v2/health/ready"), c.post("/v3/completions", json={"model": "fake", "prompt": "x"}),
                      c.get("/v3/models")):
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "not_ready" and r.headers["Retry-After"] == "1"
            assert c.get("/v2/health/live").status_code == 200
        finally:
            gate.set()
        _wait_ready(c)
        assert c.post("/v3/completions", json={"model": "fake", "prompt": "x"}).status_code == 200


def test_the_compare_page_needs_no_key_and_stays_out_of_the_schema(repository: Path) -> None:
    with TestClient(create_app(Settings(repository, api_key="k"), loader=FakeEngine)) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/static/page.js">' in page.text
        assert c.get("/static/page.js").status_code == c.get("/static/page.css").status_code == 200
        missing = c.get("/static/nothing.js")
        assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
        assert c.get("/v3/models").status_code == 401  # the API it calls still wants the key
        paths = c.get("/schema/openapi.json").json()["paths"]
        assert "/" not in paths and not any(p.startswith("/static") for p in paths)
        assert "/v3/models/{model_id}/manifest" in paths


def test_a_models_manifest_is_served_without_its_file_hashes_and_the_card_says_what_it_is(client: TestClient) -> None:
    r = client.get("/v3/models/fake/manifest")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["id"], body["version"], body["kind"], body["object"]) == ("fake", 1, "base", "model.manifest")
    assert body["manifest"]["built_by"] == "tests" and "files" not in body["manifest"]
    card = client.get("/v3/models").json()["data"][0]
    assert (card["id"], card["kind"], card["version"], card["weight_format"]) == ("fake", "base", 1, None)
    missing = client.get("/v1/models/nothing/manifest")
    assert missing.status_code == 404 and "served models: fake" in missing.json()["error"]["message"]

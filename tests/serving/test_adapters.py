"""Runtime LoRA adapters on a real server: listed with their base, exact against the merged model, under mixed load."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import modelrepo
from demo.data import REFERENCE_PROMPT
from demo.make_sources import DemoSources
from tests.serving.conftest import Server
from tests.support import DemoRepository, metric, pinned_manifest, prompt_texts, same_greedy_answer, wait_for

pytestmark = pytest.mark.slow


def publish_adapter(repo: Path, name: str, source: Path, work: Path, base: str = "base_model") -> modelrepo.Entry:
    """Publish a PEFT adapter folder as a runtime adapter, with its scale lora_alpha / r."""
    folder = work / name
    folder.mkdir(parents=True)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(source / f, folder / f)
    config = json.loads((source / "adapter_config.json").read_text())
    return modelrepo.publish_version(
        repo, name, "adapter", folder, pinned_manifest(), base=base, alpha=config["lora_alpha"] / config["r"]
    )


@pytest.fixture(scope="module")
def adapter_server(
    start_server, demo_repository: DemoRepository, demo_sources: DemoSources, tmp_path_factory: pytest.TempPathFactory
) -> Server:
    repo = demo_repository.copy_to(tmp_path_factory.mktemp("adapter-repo"))
    work = tmp_path_factory.mktemp("adapter-src")
    publish_adapter(repo, "sql_adapter", demo_sources.sql_adapter, work)
    publish_adapter(repo, "spell_adapter", demo_sources.spell_adapter, work)
    return start_server(repo)


def _complete(http: httpx.Client, model: str, prompt: str, max_tokens: int = 40) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = http.post("/v3/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_adapters_are_listed_with_their_base_as_parent(adapter_server: Server) -> None:
    with adapter_server.client() as http:
        cards = {m["id"]: m for m in http.get("/v3/models").json()["data"]}
        assert set(cards) == {"base_model", "merged_model", "sql_adapter", "spell_adapter"}
        assert cards["sql_adapter"]["parent"] == "base_model" and cards["spell_adapter"]["parent"] == "base_model"
        assert cards["base_model"]["parent"] is None and cards["merged_model"]["parent"] is None
        assert http.get("/v1/models/sql_adapter").json()["parent"] == "base_model"
        config = http.get("/v1/config").json()
        assert config["sql_adapter"]["kind"] == "adapter" and config["sql_adapter"]["base"] == "base_model"


def test_greedy_output_through_the_runtime_adapter_equals_the_merged_model(
    adapter_server: Server, demo_sources: DemoSources
) -> None:
    with adapter_server.client() as http:
        for prompt in [REFERENCE_PROMPT, *prompt_texts(demo_sources.sql_prompts)]:
            merged = _complete(http, "merged_model", prompt)
            assert same_greedy_answer(_complete(http, "sql_adapter", prompt), merged)
            assert "SELECT" in merged
        # the base's own name runs with no adapter, whatever ran before it
        base = _complete(http, "base_model", REFERENCE_PROMPT)
        assert base != _complete(http, "sql_adapter", REFERENCE_PROMPT)
        assert base == _complete(http, "base_model", REFERENCE_PROMPT)
        spell = _complete(http, "spell_adapter", REFERENCE_PROMPT)
        assert spell != base and spell != merged


def test_mixed_concurrent_load_over_base_two_adapters_and_merged_gives_correct_answers(
    adapter_server: Server, demo_sources: DemoSources
) -> None:
    prompts = prompt_texts(demo_sources.sql_prompts)[:4] + prompt_texts(demo_sources.spell_prompts)[:2]
    models = ("base_model", "sql_adapter", "spell_adapter", "merged_model")
    jobs = [(m, p) for p in prompts for m in models] * 2  # 48 requests from 16 clients
    with adapter_server.client() as http:
        expected = {job: _complete(http, *job) for job in set(jobs)}
    for p in prompts:  # the adapter's exactness holds for every prompt
        assert same_greedy_answer(expected[("sql_adapter", p)], expected[("merged_model", p)])
    switches = metric(adapter_server.url, "lora_serve_adapter_switches_total", "base_model")

    def ask(job: tuple[str, str]) -> str:
        with adapter_server.client() as http:
            return _complete(http, *job)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    wrong = [(job, got) for job, got in zip(jobs, answers, strict=True) if got != expected[job]]
    assert wrong == []
    assert metric(adapter_server.url, "lora_serve_adapter_switches_total", "base_model") > switches


def test_streaming_through_an_adapter(adapter_server: Server) -> None:
    body = {"model": "sql_adapter", "prompt": REFERENCE_PROMPT, "max_tokens": 30, "stream": True}
    with adapter_server.client() as http:
        merged = _complete(http, "merged_model", REFERENCE_PROMPT, 30)
        with http.stream("POST", "/v3/completions", json=body) as r:
            data = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert same_greedy_answer("".join(c["text"] for d in data[:-1] for c in json.loads(d)["choices"]), merged)


def test_a_client_gone_mid_answer_does_not_fail_the_next_adapters_requests(adapter_server: Server) -> None:
    """The cancelled sequence leaves the pipeline before the engine switches adapters (it once failed every switch)."""
    cancelled = metric(adapter_server.url, "lora_serve_cancelled_requests_total", "base_model")
    body = {"model": "base_model", "prompt": REFERENCE_PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with adapter_server.client() as http:
        with http.stream("POST", "/v3/completions", json=body) as r:
            next(x for x in r.iter_lines() if x.startswith("data: "))  # the first chunk, then away
        wait_for(
            lambda: metric(adapter_server.url, "lora_serve_cancelled_requests_total", "base_model") > cancelled,
            what="the engine to drop the abandoned request",
        )
        for model in ("sql_adapter", "spell_adapter", "base_model"):
            assert _complete(http, model, REFERENCE_PROMPT, 8)


def test_an_unknown_adapter_is_404_listing_what_exists(adapter_server: Server) -> None:
    with adapter_server.client() as http:
        r = http.post("/v3/completions", json={"model": "sql_adaptor", "prompt": "x"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["param"] == "model" and "sql_adapter" in err["message"] and "spell_adapter" in err["message"]


def test_publishing_and_removing_an_adapter_under_load_drops_no_request(
    adapter_server: Server, demo_sources: DemoSources, tmp_path: Path
) -> None:
    repo = adapter_server.repository
    stop = threading.Event()
    failures: list[str] = []
    answered = [0]
    with adapter_server.client() as http:
        expected = {m: _complete(http, m, REFERENCE_PROMPT, 24) for m in ("base_model", "sql_adapter", "merged_model")}

    def loop(model: str) -> None:
        with adapter_server.client() as http:
            while not stop.is_set():
                body = {"model": model, "prompt": REFERENCE_PROMPT, "max_tokens": 24, "temperature": 0}
                try:
                    r = http.post("/v3/completions", json=body)
                    if r.status_code != 200 or r.json()["choices"][0]["text"] != expected[model]:
                        failures.append(f"{model}: {r.status_code} {r.text[:200]}")
                    answered[0] += 1
                except httpx.HTTPError as e:
                    failures.append(f"{model}: {e!r}")

    clients = [threading.Thread(target=loop, args=(m,)) for m in ("base_model", "sql_adapter", "merged_model") * 2]
    for c in clients:
        c.start()
    try:
        started = time.monotonic()
        publish_adapter(repo, "sql_adapter_b", demo_sources.sql_adapter, tmp_path)
        with adapter_server.client() as http:
            deadline = time.monotonic() + 30
            while "sql_adapter_b" not in {m["id"] for m in http.get("/v3/models").json()["data"]}:
                assert time.monotonic() < deadline, "the new adapter did not appear"
                time.sleep(0.1)
            appeared = time.monotonic() - started
            assert _complete(http, "sql_adapter_b", REFERENCE_PROMPT, 24) == expected["sql_adapter"]
            modelrepo.remove_entry(repo, "sql_adapter_b")
            while "sql_adapter_b" in {m["id"] for m in http.get("/v3/models").json()["data"]}:
                assert time.monotonic() < deadline, "the removed adapter is still listed"
                time.sleep(0.1)
    finally:
        stop.set()
        for c in clients:
            c.join()
    assert failures == []
    assert answered[0] > 10
    assert appeared < 15  # "within seconds", on a busy 2-core machine


def _live_version(http: httpx.Client, name: str) -> int | None:
    status = http.get("/v1/config").json().get(name, {}).get("model_version_status", [])
    return next((int(s["version"]) for s in status if s["state"] == "AVAILABLE"), None)


def test_adapter_changes_on_a_served_base_take_effect_without_a_compile(
    adapter_server: Server, demo_sources: DemoSources, tmp_path: Path
) -> None:
    """A new adapter, a new version of it with other weights, and its removal: the base's engine stays, no compile."""
    repo, url = adapter_server.repository, adapter_server.url
    with adapter_server.client() as http:
        sql = _complete(http, "sql_adapter", REFERENCE_PROMPT, 24)
        spell = _complete(http, "spell_adapter", REFERENCE_PROMPT, 24)
        assert sql != spell  # else the new version's weights could not be told from the old's
        builds = metric(url, "lora_serve_engine_builds_total", "base_model")
        live = metric(url, "lora_serve_live_adapter_updates_total", "base_model")
        assert builds >= 1

        publish_adapter(repo, "moving_adapter", demo_sources.sql_adapter, tmp_path / "v1")
        wait_for(lambda: _live_version(http, "moving_adapter") == 1, what="moving_adapter v1")
        assert _complete(http, "moving_adapter", REFERENCE_PROMPT, 24) == sql

        publish_adapter(repo, "moving_adapter", demo_sources.spell_adapter, tmp_path / "v2")
        wait_for(lambda: _live_version(http, "moving_adapter") == 2, what="moving_adapter v2")
        assert _complete(http, "moving_adapter", REFERENCE_PROMPT, 24) == spell
        assert _complete(http, "sql_adapter", REFERENCE_PROMPT, 24) == sql

        modelrepo.remove_entry(repo, "moving_adapter")
        wait_for(lambda: _live_version(http, "moving_adapter") is None, what="moving_adapter removed")
        assert http.post("/v3/completions", json={"model": "moving_adapter", "prompt": "x"}).status_code == 404
    assert metric(url, "lora_serve_engine_builds_total", "base_model") == builds
    assert metric(url, "lora_serve_live_adapter_updates_total", "base_model") == live + 3


def test_the_first_adapter_on_a_model_builds_its_engine_again(
    adapter_server: Server, demo_sources: DemoSources, tmp_path: Path
) -> None:
    """An engine built without adapters has no LoRA variables: the first adapter on its model needs a compile."""
    repo, url = adapter_server.repository, adapter_server.url
    builds = metric(url, "lora_serve_engine_builds_total", "merged_model")
    with adapter_server.client() as http:
        merged = _complete(http, "merged_model", REFERENCE_PROMPT, 24)
        publish_adapter(repo, "on_merged", demo_sources.spell_adapter, tmp_path, base="merged_model")
        wait_for(lambda: _live_version(http, "on_merged") == 1, what="the adapter on merged_model")
        assert _complete(http, "merged_model", REFERENCE_PROMPT, 24) == merged
        assert http.post("/v3/completions", json={"model": "on_merged", "prompt": "x"}).status_code == 200
        modelrepo.remove_entry(repo, "on_merged")
        wait_for(lambda: _live_version(http, "on_merged") is None, what="the adapter on merged_model removed")
    assert metric(url, "lora_serve_engine_builds_total", "merged_model") == builds + 1


def test_an_adapter_that_cannot_load_is_reported_and_the_rest_keeps_serving(
    adapter_server: Server, tmp_path: Path
) -> None:
    repo = adapter_server.repository
    builds = metric(adapter_server.url, "lora_serve_engine_builds_total", "base_model")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (broken / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    modelrepo.publish_version(repo, "broken_adapter", "adapter", broken, {"built_by": "tests"}, base="base_model",
                              alpha=2.0)
    with adapter_server.client() as http:
        deadline = time.monotonic() + 30
        while "broken_adapter" not in http.get("/v2/health/ready").json()["failures"]:
            assert time.monotonic() < deadline, "the broken adapter was not reported"
            time.sleep(0.1)
        assert "load failed" in http.get("/v2/health/ready").json()["failures"]["broken_adapter"]["error"]
        assert http.post("/v3/completions", json={"model": "broken_adapter", "prompt": "x"}).status_code == 404
        adapter = _complete(http, "sql_adapter", REFERENCE_PROMPT)
        assert same_greedy_answer(adapter, _complete(http, "merged_model", REFERENCE_PROMPT))
        assert "base_model" not in http.get("/v2/health/ready").json()["failures"]
    assert metric(adapter_server.url, "lora_serve_engine_builds_total", "base_model") == builds  # refused unbuilt
    modelrepo.remove_entry(repo, "broken_adapter")

"""Hot reload on a real server: publish under load, a broken version, new names, rollback and removal."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import modelrepo
from demo.data import REFERENCE_PROMPT
from tests.serving.conftest import Server, version_source
from tests.support import DemoRepository, metric, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reload_server(start_server, demo_repository: DemoRepository, tmp_path_factory: pytest.TempPathFactory) -> Server:
    return start_server(demo_repository.copy_to(tmp_path_factory.mktemp("reload-repo")))


def _live(server: Server) -> dict[str, int]:
    return httpx.get(f"{server.url}/v2/health/ready").json()["models"]


@contextlib.contextmanager
def _asking(server: Server, seen: Counter[str], failures: list[str]) -> Iterator[None]:
    """Four clients (two streaming) ask merged_model for the SQL while the block runs; `seen` counts the versions
    that answered (system_fingerprint), `failures` gets every wrong answer."""
    stop = threading.Event()

    def client_loop(stream: bool) -> None:
        body = {"model": "merged_model", "prompt": REFERENCE_PROMPT, "max_tokens": 24, "stream": stream}
        with server.client() as http:
            while not stop.is_set():
                try:
                    if stream:
                        with http.stream("POST", "/v3/completions", json=body) as r:
                            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
                        if r.status_code != 200 or lines[-1] != "data: [DONE]" or '"error"' in "".join(lines):
                            failures.append(f"stream {r.status_code}: {lines[-2:]}")
                        else:
                            seen[httpx.Response(200, content=lines[0][6:]).json()["system_fingerprint"]] += 1
                    else:
                        r = http.post("/v3/completions", json=body)
                        if r.status_code != 200 or "SELECT" not in r.json()["choices"][0]["text"]:
                            failures.append(f"{r.status_code}: {r.text[:200]}")
                        else:
                            seen[r.json()["system_fingerprint"]] += 1
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    clients = [threading.Thread(target=client_loop, args=(i % 2 == 1,)) for i in range(4)]
    for c in clients:
        c.start()
    try:
        wait_for(lambda: sum(seen.values()) >= 8, 30, "the first answers")
        yield
    finally:
        stop.set()
        for c in clients:
            c.join()


def test_publishing_under_load_switches_versions_with_no_failed_request(reload_server: Server, tmp_path: Path) -> None:
    repo = reload_server.repository
    before = _live(reload_server)["merged_model"]
    seen: Counter[str] = Counter()
    failures: list[str] = []
    with _asking(reload_server, seen, failures):
        entry = modelrepo.publish_version(
            repo, "merged_model", "merged", version_source(repo, "merged_model", tmp_path / "ir"), {"built_by": "test"}
        )
        assert entry.version == before + 1
        wait_for(lambda: seen[entry.path] >= 8, 30, "answers from the new version")
    assert failures == []
    assert seen[f"merged_model/{before}"] > 0 and seen[entry.path] > 0
    assert _live(reload_server)["merged_model"] == entry.version
    # the old version's pipeline is released once its last request is done
    metrics = f"{reload_server.url}/metrics"
    retired = 'lora_serve_engines{state="retiring"} 0.0'
    wait_for(lambda: retired in httpx.get(metrics).text, 30, "the old engine's release")
    assert 'lora_serve_engines{state="live"} 2.0' in httpx.get(metrics).text


def test_a_staged_version_is_built_ahead_and_its_promotion_swaps_with_no_compile(
    reload_server: Server, tmp_path: Path
) -> None:
    repo, url = reload_server.repository, reload_server.url
    before = _live(reload_server)["merged_model"]
    builds = metric(url, "lora_serve_engine_builds_total", "merged_model")
    seen: Counter[str] = Counter()
    failures: list[str] = []

    def staged() -> dict[str, dict[str, object]]:
        return httpx.get(f"{url}/v2/health/ready").json()["staged"]

    with _asking(reload_server, seen, failures):
        source = version_source(repo, "merged_model", tmp_path / "ir")
        entry = modelrepo.publish_version(repo, "merged_model", "merged", source, {"built_by": "test"}, stage=True)
        wait_for(lambda: staged().get("merged_model", {}).get("ready") is True, 60, "the staged version's engine")
        assert staged()["merged_model"]["version"] == entry.version
        assert metric(url, "lora_serve_engine_builds_total", "merged_model") == builds + 1  # built ahead
        assert 'lora_serve_engines{state="staged"} 1.0' in httpx.get(f"{url}/metrics").text
        assert _live(reload_server)["merged_model"] == before and seen[entry.path] == 0  # not live
        modelrepo.promote(repo, "merged_model")
        wait_for(lambda: seen[entry.path] >= 8, 30, "answers from the promoted version")
    assert failures == []
    assert _live(reload_server)["merged_model"] == entry.version and staged() == {}
    assert metric(url, "lora_serve_engine_builds_total", "merged_model") == builds + 1  # no compile at the promotion
    assert 'lora_serve_engines{state="staged"} 0.0' in httpx.get(f"{url}/metrics").text


def test_a_version_that_fails_to_load_is_reported_and_the_old_one_keeps_serving(
    reload_server: Server, tmp_path: Path
) -> None:
    repo = reload_server.repository
    live = _live(reload_server)["merged_model"]
    broken = version_source(repo, "merged_model", tmp_path / "broken")
    (broken / "openvino_model.bin").unlink()  # the manifest will match, but the IR cannot load
    entry = modelrepo.publish_version(repo, "merged_model", "merged", broken, {"built_by": "test"})

    def reported() -> bool:
        return "merged_model" in httpx.get(f"{reload_server.url}/v2/health/ready").json()["failures"]

    wait_for(reported, 30, "the failure in readiness")
    with reload_server.client() as http:
        ready = http.get("/v2/health/ready")
        assert ready.status_code == 200
        failure = ready.json()["failures"]["merged_model"]
        assert failure["version"] == entry.version and "load failed" in failure["error"]
        r = http.post("/v3/completions", json={"model": "merged_model", "prompt": REFERENCE_PROMPT, "max_tokens": 8})
        assert r.status_code == 200 and r.json()["system_fingerprint"] == f"merged_model/{live}"
        assert 'lora_serve_model_load_failed{error="load failed' in http.get("/metrics").text
        states = http.get("/v1/config").json()["merged_model"]["model_version_status"]
        assert {(s["version"], s["state"]) for s in states} == {(str(live), "AVAILABLE"), (str(entry.version), "END")}
        # rolling back to the good version clears the failure
        modelrepo.rollback(repo, "merged_model", live)
        config = http.post("/v1/config/reload").json()
        assert config["merged_model"]["model_version_status"][0]["state"] == "AVAILABLE"
        assert "merged_model" not in http.get("/v2/health/ready").json()["failures"]


def test_a_tampered_version_fails_verification_and_is_not_served(reload_server: Server, tmp_path: Path) -> None:
    repo = reload_server.repository
    live = _live(reload_server)["base_model"]
    source = version_source(repo, "base_model", tmp_path / "ir")
    staged = tmp_path / "tampered"
    shutil.copytree(source, staged)
    # publish a copy to a private repository, tamper with it there, then move it into place and point the index at it
    private = tmp_path / "private"
    entry = modelrepo.publish_version(private, "base_model", "base", staged, {"built_by": "test"})
    (private / entry.path / "config.json").write_text("{}")
    version = max(int(p.name) for p in (repo / "base_model").iterdir() if p.name.isdigit()) + 1
    shutil.copytree(private / entry.path, repo / "base_model" / str(version))
    modelrepo.commit_entry(repo, modelrepo.Entry("base_model", "base", version))
    ready = f"{reload_server.url}/v2/health/ready"
    wait_for(lambda: "base_model" in httpx.get(ready).json()["failures"], 30, "the verification failure")
    failure = httpx.get(f"{reload_server.url}/v2/health/ready").json()["failures"]["base_model"]
    assert "sha256" in failure["error"]
    assert _live(reload_server)["base_model"] == live
    modelrepo.rollback(reload_server.repository, "base_model", live)


def test_new_names_appear_and_removed_names_disappear(reload_server: Server, tmp_path: Path) -> None:
    repo = reload_server.repository
    modelrepo.publish_version(
        repo, "sql_copy", "merged", version_source(repo, "merged_model", tmp_path / "ir"), {"built_by": "test"}
    )
    with reload_server.client() as http:
        wait_for(lambda: "sql_copy" in {m["id"] for m in http.get("/v3/models").json()["data"]}, 30, "the new name")
        r = http.post("/v3/completions", json={"model": "sql_copy", "prompt": REFERENCE_PROMPT, "max_tokens": 8})
        assert r.status_code == 200 and "SELECT" in r.json()["choices"][0]["text"]
        modelrepo.remove_entry(repo, "sql_copy")
        wait_for(lambda: "sql_copy" not in {m["id"] for m in http.get("/v3/models").json()["data"]}, 30, "the removal")
        r = http.post("/v3/completions", json={"model": "sql_copy", "prompt": "x"})
        assert r.status_code == 404

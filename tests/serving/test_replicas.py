"""Replicas serving a bucket: publish and serve end to end, a store that stops answering, a replica started
mid-publish, three replicas converging under load. Real servers, a real S3 server (moto) on loopback."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import obstore
import pytest

import modelrepo
import modelrepo.objectstore
from demo.data import REFERENCE_PROMPT
from tests.conftest import S3Server
from tests.serving.conftest import Server, version_source
from tests.support import DemoRepository, metric, pinned_manifest, wait_for

pytestmark = pytest.mark.slow
POLL_INTERVAL = 2.0  # the server's default


def _ready(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.url}/v2/health/ready", timeout=10).json()


def _publish(bucket: str, demo: DemoRepository, name: str, work: Path) -> modelrepo.Entry:
    """A new version of `name` in the bucket, with the demo repository's files for it."""
    kind = modelrepo.read_index(demo.root).entries[name].kind
    source = version_source(demo.root, name, work / f"{name}-{time.monotonic_ns()}")
    return modelrepo.publish_version(bucket, name, kind, source, pinned_manifest())


def _start_replica(start_server, bucket: str, cache: Path, *args: str) -> Server:
    return start_server(bucket, "--cache-dir", str(cache), *args)  # type: ignore[no-any-return]


class Load:
    """One client thread per server asking merged_model in a loop; answers counted by the version that gave them."""

    def __init__(self, servers: list[Server], threads_per_server: int = 1) -> None:
        self.stop = threading.Event()
        self.seen: Counter[str] = Counter()
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(s,), daemon=True)
            for s in servers
            for _ in range(threads_per_server)
        ]

    def _loop(self, server: Server) -> None:
        body = {"model": "merged_model", "prompt": REFERENCE_PROMPT, "max_tokens": 16}
        with server.client() as http:
            while not self.stop.is_set():
                try:
                    r = http.post("/v3/completions", json=body)
                    if r.status_code != 200 or "SELECT" not in r.json()["choices"][0]["text"]:
                        self.failures.append(f"{server.url} {r.status_code}: {r.text[:200]}")
                    else:
                        self.seen[r.json()["system_fingerprint"]] += 1
                except httpx.HTTPError as e:
                    self.failures.append(f"{server.url} {e!r}")

    def answers(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


@pytest.fixture
def published_bucket(bucket: str, demo_repository: DemoRepository, tmp_path: Path) -> str:
    """A bucket serving the demo's two models, version 1 of each."""
    for name in ("base_model", "merged_model"):
        _publish(bucket, demo_repository, name, tmp_path)
    return bucket


def test_a_replica_serves_a_bucket_from_a_checked_local_copy_and_follows_its_publishes(
    start_server, published_bucket: str, demo_repository: DemoRepository, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    server = _start_replica(start_server, published_bucket, cache)
    ready = _ready(server)
    assert ready["models"] == {"base_model": 1, "merged_model": 1}
    assert ready["store"]["location"] == published_bucket and ready["store"]["stale"] is False
    copy = modelrepo.open_store(published_bucket).cache_folder(cache)  # type: ignore[attr-defined]
    with server.client() as http:
        r = http.post("/v3/completions", json={"model": "merged_model", "prompt": REFERENCE_PROMPT, "max_tokens": 16})
        assert r.status_code == 200 and "SELECT" in r.json()["choices"][0]["text"]
        assert r.json()["system_fingerprint"] == "merged_model/1"

        entry = _publish(published_bucket, demo_repository, "merged_model", tmp_path)
        wait_for(lambda: _ready(server)["models"]["merged_model"] == entry.version, 120, "the new version")
        r = http.post("/v3/completions", json={"model": "merged_model", "prompt": REFERENCE_PROMPT, "max_tokens": 16})
        assert r.status_code == 200 and r.json()["system_fingerprint"] == entry.path
        # The copy holds what is served, each version checked; the replaced version is evicted once unused.
        wait_for(lambda: not (copy / "merged_model" / "1").exists(), 120, "the eviction of merged_model/1")
        assert sorted(p.name for p in (copy / "merged_model").iterdir()) == [str(entry.version)]
        assert [modelrepo.verify_version(copy / path) for path in (entry.path, "base_model/1")] == [[], []]
        metrics = http.get("/metrics").text
        assert "lora_serve_store_stale 0.0" in metrics and 'lora_serve_store_polls_total{outcome="ok"}' in metrics

        # A version whose files in the bucket are not what its manifest says: reported, never copied, not served.
        tampered = _tampered_copy(published_bucket, entry.path, f"merged_model/{entry.version + 1}")
        modelrepo.commit_entry(published_bucket, modelrepo.Entry("merged_model", "merged", tampered))
        wait_for(lambda: "merged_model" in _ready(server)["failures"], 120, "the failure in readiness")
        failure = _ready(server)["failures"]["merged_model"]
        assert failure["version"] == tampered and "sha256 differs from the manifest" in failure["error"]
        assert not (copy / "merged_model" / str(tampered)).exists()
        r = http.post("/v3/completions", json={"model": "merged_model", "prompt": REFERENCE_PROMPT, "max_tokens": 16})
        assert r.status_code == 200 and r.json()["system_fingerprint"] == entry.path


def _tampered_copy(bucket: str, source: str, dest: str) -> int:
    """Copy a version's objects to `dest` in the bucket with one weights byte changed; returns dest's number."""
    store = modelrepo.open_store(bucket)
    s3 = store.s3  # type: ignore[attr-defined]
    for batch in obstore.list(s3, prefix=source):
        for meta in batch:
            data = bytes(obstore.get(s3, meta["path"]).bytes())
            rel = meta["path"].removeprefix(f"{source}/")
            if rel == "openvino_model.bin":
                data = bytes([data[0] ^ 1]) + data[1:]
            if rel != "manifest.json":
                obstore.put(s3, f"{dest}/{rel}", data)
    obstore.put(s3, f"{dest}/manifest.json", bytes(obstore.get(s3, f"{source}/manifest.json").bytes()))  # last
    return int(dest.rsplit("/", 1)[1])


def test_a_replica_keeps_serving_while_its_store_is_down_says_it_is_stale_and_catches_up(
    start_server, own_s3: S3Server, demo_repository: DemoRepository, tmp_path: Path
) -> None:
    bucket = own_s3.new_bucket()
    first = _publish(bucket, demo_repository, "merged_model", tmp_path)
    cache = tmp_path / "cache"
    server = _start_replica(start_server, bucket, cache)
    own_s3.pause()
    try:
        with Load([server], threads_per_server=2) as load:
            wait_for(lambda: _ready(server)["store"]["stale"], 120, "readiness to say the store is stale")
            ready = _ready(server)
            assert ready["status"] == "ready" and ready["models"] == {"merged_model": 1} and ready["store"]["error"]
            assert "lora_serve_store_stale 1.0" in httpx.get(f"{server.url}/metrics").text
            during = load.answers()
            wait_for(lambda: load.answers() >= during + 8, 120, "answers while the store is down")
        assert load.failures == []
        # Restarted while the store is still down, a replica serves the copy it has (checked again: it did not
        # download it), and says it is stale.
        server.process.terminate()
        server.process.wait(30)
        server = _start_replica(start_server, bucket, cache)
        ready = _ready(server)
        assert ready["models"] == {"merged_model": first.version} and ready["store"]["stale"] is True
        assert ready["store"]["last_sync_age_seconds"] is None
    finally:
        own_s3.resume()
    with Load([server], threads_per_server=2) as load:
        wait_for(lambda: load.seen[first.path] >= 4, 120, "answers from the copy")
        entry = _publish(bucket, demo_repository, "merged_model", tmp_path)
        wait_for(lambda: _ready(server)["models"]["merged_model"] == entry.version, 120, "the catch-up")
        wait_for(lambda: load.seen[entry.path] >= 4, 120, "answers from the new version")
    assert load.failures == []
    assert _ready(server)["store"]["stale"] is False
    assert "lora_serve_store_stale 0.0" in httpx.get(f"{server.url}/metrics").text


class PausedUpload:
    """Once armed, holds the next bucket publish after its first uploaded file until `go` is set.

    The publish itself is the real one, in a thread of the test; only its pace is ours.
    """

    def __init__(self) -> None:
        self.armed, self.uploading, self.go = threading.Event(), threading.Event(), threading.Event()
        self.calls = 0
        self.real = modelrepo.objectstore._upload

    def upload(self, s3: Any, key: str, path: Path) -> None:
        if self.armed.is_set():
            self.calls += 1
            if self.calls == 2:
                self.uploading.set()
                self.go.wait(300)
        self.real(s3, key, path)


@pytest.fixture
def paused_upload(monkeypatch: pytest.MonkeyPatch) -> Iterator[PausedUpload]:
    paused = PausedUpload()
    monkeypatch.setattr(modelrepo.objectstore, "_upload", paused.upload)
    try:
        yield paused
    finally:
        paused.go.set()


def test_a_replica_started_while_a_publish_is_in_progress_serves_the_committed_version_then_the_new_one(
    start_server, bucket: str, demo_repository: DemoRepository, tmp_path: Path, paused_upload: PausedUpload
) -> None:
    first = _publish(bucket, demo_repository, "merged_model", tmp_path)
    paused_upload.armed.set()
    published: list[modelrepo.Entry] = []
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            published.append(_publish(bucket, demo_repository, "merged_model", tmp_path))
        except BaseException as e:
            errors.append(e)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        assert paused_upload.uploading.wait(120), "the publish did not start uploading"
        # The bucket now holds merged_model/2/ half uploaded, its claim, no manifest; the index names version 1.
        server = _start_replica(start_server, bucket, tmp_path / "cache")
        assert _ready(server)["models"] == {"merged_model": first.version}
        copy = modelrepo.open_store(bucket).cache_folder(tmp_path / "cache")  # type: ignore[attr-defined]
        assert sorted(p.name for p in (copy / "merged_model").iterdir()) == [str(first.version)]
    finally:
        paused_upload.go.set()
        publisher.join()
    assert errors == [] and published[0].version == first.version + 1
    wait_for(lambda: _ready(server)["models"]["merged_model"] == published[0].version, 120, "the new version")
    r = httpx.post(f"{server.url}/v3/completions", json={"model": "merged_model", "prompt": REFERENCE_PROMPT},
                   timeout=60)
    assert r.status_code == 200 and r.json()["system_fingerprint"] == published[0].path


def test_three_replicas_under_load_converge_on_a_publish_with_no_failed_request(
    start_server, bucket: str, demo_repository: DemoRepository, tmp_path: Path
) -> None:
    first = _publish(bucket, demo_repository, "merged_model", tmp_path)
    replicas = [
        _start_replica(start_server, bucket, tmp_path / f"cache-{i}", "--poll-interval", str(POLL_INTERVAL))
        for i in range(3)
    ]
    converged: dict[str, float] = {}
    with Load(replicas) as load:
        wait_for(lambda: load.seen[first.path] >= 6, 120, "answers from every replica")
        entry = _publish(bucket, demo_repository, "merged_model", tmp_path)
        committed = time.monotonic()  # the index names the new version from here on

        def all_switched() -> bool:
            for r in replicas:
                if r.url not in converged and _ready(r)["models"]["merged_model"] == entry.version:
                    converged[r.url] = time.monotonic() - committed
            return len(converged) == len(replicas)

        wait_for(all_switched, 120, "all three replicas on the new version")
        before = load.seen[entry.path]
        wait_for(lambda: load.seen[entry.path] >= before + 6, 120, "answers from the new version")
    assert load.failures == []
    for r in replicas:
        answer = httpx.post(f"{r.url}/v3/completions", json={"model": "merged_model", "prompt": REFERENCE_PROMPT},
                            timeout=60)
        assert answer.json()["system_fingerprint"] == entry.path
    # Measured, not asserted (speed belongs to bench/): poll interval + download + load + warm-up, per replica.
    print(f"\nconvergence of 3 replicas (poll {POLL_INTERVAL:g} s): "
          + ", ".join(f"{t:.1f} s" for t in sorted(converged.values())))



def test_replicas_build_a_staged_version_ahead_and_switch_on_its_promotion_with_no_compile(
    start_server, bucket: str, demo_repository: DemoRepository, tmp_path: Path
) -> None:
    first = _publish(bucket, demo_repository, "merged_model", tmp_path)
    replicas = [_start_replica(start_server, bucket, tmp_path / f"cache-{i}") for i in range(2)]

    def builds(r: Server) -> float:
        return metric(r.url, "lora_serve_engine_builds_total", "merged_model")

    with Load(replicas) as load:
        wait_for(lambda: load.seen[first.path] >= 4, 120, "answers from both replicas")
        source = version_source(demo_repository.root, "merged_model", tmp_path / "staged")
        entry = modelrepo.publish_version(bucket, "merged_model", "merged", source, pinned_manifest(), stage=True)
        wait_for(
            lambda: all(_ready(r)["staged"].get("merged_model", {}).get("ready") for r in replicas),
            120,
            "the staged version built on both replicas",
        )
        built = [builds(r) for r in replicas]
        assert load.seen[entry.path] == 0
        assert all(_ready(r)["models"]["merged_model"] == first.version for r in replicas)
        modelrepo.promote(bucket, "merged_model")
        wait_for(
            lambda: all(_ready(r)["models"]["merged_model"] == entry.version for r in replicas),
            120,
            "both replicas on the promoted version",
        )
        before = load.seen[entry.path]
        wait_for(lambda: load.seen[entry.path] >= before + 4, 120, "answers from the promoted version")
    assert load.failures == []
    assert [builds(r) for r in replicas] == built  # the promotion compiled nothing


def test_a_reload_on_demand_polls_the_bucket_at_once(
    start_server, bucket: str, demo_repository: DemoRepository, tmp_path: Path
) -> None:
    _publish(bucket, demo_repository, "merged_model", tmp_path)
    server = _start_replica(start_server, bucket, tmp_path / "cache", "--poll-interval", "3600")
    entry = _publish(bucket, demo_repository, "merged_model", tmp_path)
    assert _ready(server)["models"]["merged_model"] == entry.version - 1  # the next poll is an hour away
    config = httpx.post(f"{server.url}/v1/config/reload", timeout=120).json()
    assert config["merged_model"]["model_version_status"][0]["version"] == str(entry.version)
    assert _ready(server)["models"]["merged_model"] == entry.version

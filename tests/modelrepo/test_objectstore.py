"""The repository contract on an S3-compatible server (moto on loopback): no rename, no lock, the same guarantees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import obstore
import pytest
from botocore.exceptions import ClientError

import modelrepo
from modelrepo import RepositoryError, read_index
from modelrepo.index import Index
from modelrepo.objectstore import CLAIM, ObjectStore, parse_url
from modelrepo.store import Snapshot
from tests.modelrepo.test_repository import check_staging

ROOT = Path(__file__).parents[2]


def _ir(folder: Path, payload: str = "weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "openvino_model.xml").write_text("<net/>")
    (folder / "openvino_model.bin").write_text(payload)
    return folder


def _keys(repository: str, under: str = "") -> list[str]:
    bucket, prefix = parse_url(repository)
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{under}")
    return sorted(o["Key"].removeprefix(f"{prefix}/") for o in listed.get("Contents", []))


def test_the_test_server_enforces_conditional_writes_and_decides_them_atomically(bucket: str) -> None:
    """What the other tests rely on, checked with another client (boto3) than the code under test's."""
    name, _ = parse_url(bucket)
    s3 = boto3.client("s3")
    etag = s3.put_object(Bucket=name, Key="k", Body=b"one", IfNoneMatch="*")["ETag"]

    def status(call, **kwargs) -> int:
        try:
            return call(Bucket=name, Key="k", **kwargs)["ResponseMetadata"]["HTTPStatusCode"]
        except ClientError as e:
            return e.response["ResponseMetadata"]["HTTPStatusCode"]

    assert status(s3.put_object, Body=b"two", IfNoneMatch="*") == 412  # the object exists
    assert status(s3.put_object, Body=b"two", IfMatch='"0123456789abcdef0123456789abcdef"') == 412  # stale ETag
    assert status(s3.put_object, Body=b"two", IfMatch=etag) == 200
    assert status(s3.put_object, Body=b"three", IfMatch=etag) == 412  # the ETag it was read at is gone
    assert status(s3.get_object, IfNoneMatch=s3.head_object(Bucket=name, Key="k")["ETag"]) == 304

    # Atomic: of 8 writers racing with the same If-Match, exactly one wins, every round.
    store = ObjectStore(bucket).s3

    def write(i: int, current: str, barrier: threading.Barrier, wins: list[int], errors: list[Exception]) -> None:
        barrier.wait()
        try:
            obstore.put(store, "race", f"writer {i}".encode(), mode={"e_tag": current})
            wins.append(i)
        except obstore.exceptions.PreconditionError:
            pass
        except Exception as e:
            errors.append(e)

    for round_ in range(10):
        current = obstore.put(store, "race", f"base {round_}".encode())["e_tag"]
        barrier, wins, errors = threading.Barrier(8), [], []
        threads = [threading.Thread(target=write, args=(i, current, barrier, wins, errors)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(wins) == 1, (round_, wins, errors)


def test_publish_into_a_bucket_uploads_checks_then_commits(bucket: str, tmp_path: Path) -> None:
    entry = modelrepo.publish_version(bucket, "merged_model", "merged", _ir(tmp_path / "ir"), {"built_by": "test"})
    assert (entry.name, entry.kind, entry.version, entry.path) == ("merged_model", "merged", 1, "merged_model/1")
    store = modelrepo.open_store(bucket)
    manifest = store.read_manifest("merged_model/1")
    assert manifest["version"] == 1 and manifest["built_by"] == "test"
    assert set(manifest["files"]) == {"openvino_model.xml", "openvino_model.bin", "graph.pbtxt"}
    assert store.verify_version("merged_model/1") == []
    assert read_index(bucket).entries["merged_model"].version == 1
    # No claim is left behind: the version holds its files and its manifest, nothing else.
    assert _keys(bucket) == [
        "config.json",
        "index.json",
        "merged_model/1/graph.pbtxt",
        "merged_model/1/manifest.json",
        "merged_model/1/openvino_model.bin",
        "merged_model/1/openvino_model.xml",
    ]
    config = json.loads(bytes(obstore.get(store.s3, "config.json").bytes()))
    assert config == {"model_config_list": [{"config": {"name": "merged_model", "base_path": "merged_model/1"}}]}
    # A local copy is checked against the manifest (what publish_adapter validates on).
    copy = store.local_copy("merged_model/1", tmp_path / "cache")
    assert modelrepo.verify_version(copy) == [] and (copy / "openvino_model.bin").read_text() == "weights"
    assert store.local_copy("merged_model/1", tmp_path / "cache") == copy  # reused: same manifest, intact
    (copy / "openvino_model.bin").write_text("damaged")
    assert (store.local_copy("merged_model/1", tmp_path / "cache") / "openvino_model.bin").read_text() == "weights"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modelrepo", *args, "--repository", bucket],
                              capture_output=True, text=True, cwd=ROOT)

    modelrepo.publish_version(bucket, "merged_model", "merged", _ir(tmp_path / "ir2", "two"), {})
    assert "live 2\tkept [1, 2]" in cli("list").stdout
    out = cli("rollback", "--model", "merged_model")
    assert out.returncode == 0 and "merged_model now serves version 1" in out.stdout, out.stderr
    assert cli("verify").returncode == 0
    obstore.put(store.s3, "merged_model/1/openvino_model.bin", b"tampered")
    bad = cli("verify")
    assert bad.returncode == 1 and "openvino_model.bin: sha256 differs" in bad.stdout


def test_index_changes_are_seen_cheaply_by_etag(bucket: str, tmp_path: Path) -> None:
    store = modelrepo.open_store(bucket)
    assert store.index_token() is None and store.read_index_if_changed(None) is None
    modelrepo.publish_version(bucket, "m", "base", _ir(tmp_path / "a"), {})
    token = store.index_token()
    assert token is not None and store.read_index_if_changed(token) is None  # 304: no body read
    modelrepo.publish_version(bucket, "m", "base", _ir(tmp_path / "b", "b"), {})
    changed = store.read_index_if_changed(token)
    assert changed is not None and changed.token != token and changed.index.entries["m"].version == 2


def test_a_missing_bucket_is_an_error_not_an_empty_repository(s3_endpoint: str, tmp_path: Path) -> None:
    missing = "s3://no-such-bucket-here/models"
    with pytest.raises(RepositoryError, match=r"s3://no-such-bucket-here/models: the bucket cannot be listed: .*404"):
        read_index(missing)
    with pytest.raises(RepositoryError, match="the bucket cannot be listed"):
        modelrepo.publish_version(missing, "m", "base", _ir(tmp_path / "ir"), {})


def test_a_writer_that_loses_the_race_reads_again_and_keeps_both_entries(bucket: str, tmp_path: Path) -> None:
    """Deterministic: another publisher commits between this writer's read and its conditional write."""
    modelrepo.publish_version(bucket, "first", "base", _ir(tmp_path / "a"), {})
    src = _ir(tmp_path / "other", "other")
    writer = ObjectStore(bucket)
    calls = []

    def change(index: modelrepo.Index) -> modelrepo.Index:
        calls.append(index.generation)
        if len(calls) == 1:  # read at generation 1; someone else commits generation 2 now
            modelrepo.publish_version(ObjectStore(bucket), "second", "base", src, {})
        return index.without("first")

    after = writer.update_index(change)
    assert calls == [1, 2] and writer.lost_races == 1
    assert set(after.entries) == {"second"} and after.generation == 3
    assert read_index(bucket) == after


def test_concurrent_publishers_on_one_index_lose_no_entry(bucket: str, tmp_path: Path) -> None:
    """Four publishers (threads, each its own client): three names, and two of them racing on the same name."""
    plan = {"model_0": "model_0", "model_1": "model_1", "model_2a": "model_2", "model_2b": "model_2"}
    per_publisher = 3
    errors: list[BaseException] = []
    stores = {p: ObjectStore(bucket) for p in plan}
    barrier = threading.Barrier(len(plan))

    def publish(publisher: str) -> None:
        try:
            barrier.wait()
            for i in range(per_publisher):
                src = _ir(tmp_path / f"{publisher}-{i}", f"{publisher} {i}")
                modelrepo.publish_version(stores[publisher], plan[publisher], "merged", src, {}, retention=10)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(p,)) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    index = read_index(bucket)
    commits = len(plan) * per_publisher
    assert index.generation == commits  # every commit landed, none was overwritten
    assert {n: e.version for n, e in index.entries.items() if n != "model_2"} == {"model_0": 3, "model_1": 3}
    store = modelrepo.open_store(bucket)
    assert store.versions("model_2") == [1, 2, 3, 4, 5, 6]  # two publishers, distinct version numbers
    assert index.entries["model_2"].version in {4, 5, 6}
    for name in ("model_0", "model_1", "model_2"):
        assert all(store.verify_version(f"{name}/{v}") == [] for v in store.versions(name))
    print(f"lost races, retried: {sum(s.lost_races for s in stores.values())}")


_KILLED_UPLOAD = """
import os, signal, sys
import modelrepo.objectstore as o
real, done = o._upload, []
def upload(s3, key, path):
    real(s3, key, path)
    done.append(key)
    if len(done) == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # one file of the version uploaded, the rest not
o._upload = upload
import modelrepo
modelrepo.publish_version(sys.argv[1], "m", "merged", sys.argv[2], {})
"""


def test_a_publish_killed_mid_upload_leaves_nothing_visible_and_the_next_sweeps_it(
    bucket: str, tmp_path: Path
) -> None:
    modelrepo.publish_version(bucket, "m", "merged", _ir(tmp_path / "v1", "one"), {})
    store = ObjectStore(bucket)
    before = store.snapshot()
    proc = subprocess.run([sys.executable, "-c", _KILLED_UPLOAD, bucket, str(_ir(tmp_path / "v2", "two"))],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    assert store.snapshot() == before  # the same index object, ETag and all
    assert store.versions("m") == [1]
    assert _keys(bucket, "m/2/") == [f"m/2/{CLAIM}", "m/2/openvino_model.bin"]  # claimed, one file of two
    # The leftovers look like a live publish until nothing in them changed for stale_after: kept, number skipped.
    assert modelrepo.publish_version(store, "m", "merged", _ir(tmp_path / "v3", "three"), {}).version == 3
    assert _keys(bucket, "m/2/") != []
    # Once stale, the next publish removes them, claim included; the index never named them.
    impatient = ObjectStore(bucket, stale_after=0)
    assert modelrepo.publish_version(impatient, "m", "merged", _ir(tmp_path / "v4", "four"), {}).version == 4
    assert _keys(bucket, "m/2/") == []
    assert store.versions("m") == [1, 3, 4] and read_index(bucket).entries["m"].version == 4


def test_retention_and_rollback_on_a_bucket(bucket: str, tmp_path: Path) -> None:
    for i in range(5):
        modelrepo.publish_version(bucket, "m", "base", _ir(tmp_path / f"ir{i}", str(i)), {}, retention=2)
    store = modelrepo.open_store(bucket)
    assert store.versions("m") == [4, 5]
    assert _keys(bucket, "m/1/") == []  # removed whole, not just unlisted
    assert modelrepo.rollback(bucket, "m").version == 4
    assert read_index(bucket).entries["m"].version == 4
    with pytest.raises(RepositoryError, match="no version older than 4"):
        modelrepo.rollback(bucket, "m")
    with pytest.raises(RepositoryError, match="no version 9"):
        modelrepo.rollback(bucket, "m", 9)
    with pytest.raises(RepositoryError, match="not served"):
        modelrepo.rollback(bucket, "other")
    assert modelrepo.rollback(bucket, "m", 5).version == 5
    modelrepo.publish_version(bucket, "m", "base", _ir(tmp_path / "ir6"), {}, retention=1)
    assert store.versions("m") == [6]
    # Adapters name a served base, and a base with adapters on it is not removed.
    with pytest.raises(RepositoryError, match="base 'm2' is not a served model"):
        modelrepo.publish_version(bucket, "sql", "adapter", _ir(tmp_path / "a"), {}, base="m2", alpha=2.0)
    assert _keys(bucket, "sql/") == []  # refused before anything was uploaded
    modelrepo.publish_version(bucket, "sql", "adapter", _ir(tmp_path / "a"), {}, base="m", alpha=2.0)
    with pytest.raises(RepositoryError, match="base of adapters"):
        modelrepo.remove_entry(bucket, "m")
    modelrepo.remove_entry(bucket, "sql")
    assert set(read_index(bucket).entries) == {"m"}


def test_staging_and_promotion_on_a_bucket(bucket: str, tmp_path: Path) -> None:
    check_staging(bucket, tmp_path)


def test_a_publisher_whose_claim_was_swept_stops_before_its_manifest(bucket: str) -> None:
    """The claim is refreshed with If-Match on its own ETag: once another publish swept it as dead, the owner knows."""
    from modelrepo.objectstore import _Claim

    store = ObjectStore(bucket)
    claim = _Claim(store.s3, f"m/1/{CLAIM}", interval=0.05)
    try:
        claim.held()  # fresh: fine
        obstore.delete(store.s3, claim.key)  # what a sweep does to a claim it judged stale
        deadline = time.monotonic() + 10
        while claim.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RepositoryError, match=r"publish abandoned: the claim m/1/\.publishing was taken away"):
            claim.held()
    finally:
        claim.release()
    assert _keys(bucket) == []  # a lost claim is not written again


class _RollbackDuringSweep(ObjectStore):
    """A sweep whose index read is followed at once by another client's rollback (no lock orders the two)."""

    def __init__(self, url: str, rollback_to: int) -> None:
        super().__init__(url)
        self.rollback_to: int | None = rollback_to

    def snapshot(self) -> Snapshot:
        seen = super().snapshot()
        if self.rollback_to is not None:
            target, self.rollback_to = self.rollback_to, None
            modelrepo.rollback(self.location, "m", target)
        return seen


class _SweepDuringRollback(ObjectStore):
    """A rollback whose commit is followed at once by a retention sweep removing the version it names."""

    def update_index(self, change: Callable[[Index], Index]) -> Index:
        committed = super().update_index(change)
        entry = committed.entries["m"]
        if entry.version == 2:
            obstore.delete(self.s3, f"{entry.path}/manifest.json")  # the sweep's first delete
        return committed


def _three_versions(bucket: str, tmp_path: Path) -> None:
    for i in range(3):
        modelrepo.publish_version(bucket, "m", "base", _ir(tmp_path / f"ir{i}", str(i)), {}, retention=3)


def test_a_sweep_keeps_a_version_a_rollback_names_while_it_removes_it(bucket: str, tmp_path: Path) -> None:
    _three_versions(bucket, tmp_path)
    store = _RollbackDuringSweep(bucket, rollback_to=2)
    assert store.sweep("m", retention=1) == ["m/1"]  # read the index naming 3, then the rollback to 2 landed
    assert read_index(bucket).entries["m"].version == 2
    assert store.versions("m") == [2, 3]
    assert store.verify_version("m/2") == []  # whole, its manifest put back


def test_a_rollback_whose_version_a_sweep_removed_meanwhile_leaves_the_live_version(
    bucket: str, tmp_path: Path
) -> None:
    _three_versions(bucket, tmp_path)
    with pytest.raises(RepositoryError, match="removed by a retention sweep while rolling back"):
        modelrepo.rollback(_SweepDuringRollback(bucket), "m", 2)
    assert read_index(bucket).entries["m"].version == 3

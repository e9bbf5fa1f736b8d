"""The local copy a replica serves a bucket from: checked downloads, polls by ETag, eviction, an unreachable store."""

from __future__ import annotations

from pathlib import Path

import obstore
import pytest

import modelrepo
from modelrepo import RepositoryError
from modelrepo.mirror import Mirror
from tests.conftest import S3Server


def _ir(folder: Path, payload: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "openvino_model.xml").write_text("<net/>")
    (folder / "openvino_model.bin").write_text(payload)
    return folder


def _publish(bucket: str, tmp_path: Path, payload: str) -> modelrepo.Entry:
    return modelrepo.publish_version(bucket, "m", "base", _ir(tmp_path / payload, payload), {"built_by": "test"})


def test_a_mirror_copies_what_the_index_names_checked_and_evicts_the_rest(bucket: str, tmp_path: Path) -> None:
    one = _publish(bucket, tmp_path, "one")
    mirror = Mirror(bucket, tmp_path / "cache")
    mirror.open()
    try:
        assert mirror.stale and mirror.age() is None
        assert mirror.sync() is True and not mirror.stale and mirror.error is None
        root = mirror.root
        assert modelrepo.read_index(root).entries["m"].version == 1
        assert modelrepo.verify_version(root / one.path) == [] and mirror.problems(one.path) == []
        assert (root / "config.json").is_file()  # the copy is a repository OVMS could serve too
        assert mirror.sync() is False  # 304: nothing changed, nothing downloaded

        two = _publish(bucket, tmp_path, "two")
        (root / "m" / ".download-3-dead").mkdir()  # what a process killed mid-download leaves
        assert mirror.sync() is True
        assert modelrepo.read_index(root).entries["m"].version == 2
        assert (root / two.path / "openvino_model.bin").read_text() == "two"
        # The old version stays while something serves it; then it goes, with the dead download.
        assert mirror.evict({one.path}) == ["m/.download-3-dead"]
        assert mirror.evict(set()) == [one.path]  # what the index names stays
        assert sorted(p.name for p in (root / "m").iterdir()) == ["2"]
        assert mirror.polls == 3 and mirror.failed_polls == 0
    finally:
        mirror.close()


def test_a_version_that_does_not_match_its_manifest_never_appears_in_the_cache(bucket: str, tmp_path: Path) -> None:
    _publish(bucket, tmp_path, "one")
    two = _publish(bucket, tmp_path, "two")
    store = modelrepo.open_store(bucket)
    obstore.put(store.s3, f"{two.path}/openvino_model.bin", b"tampered")  # type: ignore[attr-defined]
    mirror = Mirror(bucket, tmp_path / "cache")
    mirror.open()
    try:
        assert mirror.sync() is True
        assert not (mirror.root / two.path).exists()
        assert not any(p.name.startswith(".download-") for p in (mirror.root / "m").iterdir())
        (problem,) = mirror.problems(two.path)
        assert "openvino_model.bin: sha256 differs from the manifest" in problem
        assert not mirror.stale  # the store answered; the version is what is wrong
    finally:
        mirror.close()


def test_one_cache_folder_serves_one_server(bucket: str, tmp_path: Path) -> None:
    first = Mirror(bucket, tmp_path / "cache")
    first.open()
    try:
        with pytest.raises(RepositoryError, match="is used by another server"):
            Mirror(bucket, tmp_path / "cache").open()
    finally:
        first.close()
    other = Mirror(bucket, tmp_path / "cache")  # free again once the first is closed
    other.open()
    other.close()


def test_an_unreachable_store_leaves_the_copy_as_it_was_and_the_next_poll_catches_up(
    own_s3: S3Server, tmp_path: Path
) -> None:
    bucket = own_s3.new_bucket()
    _publish(bucket, tmp_path, "one")
    mirror = Mirror(bucket, tmp_path / "cache")
    mirror.open()
    try:
        assert mirror.sync() is True
        synced = mirror.last_sync
        own_s3.pause()
        try:
            assert mirror.sync() is False
            assert mirror.stale and mirror.error and mirror.failed_polls == 1
            assert mirror.last_sync == synced
            assert modelrepo.read_index(mirror.root).entries["m"].version == 1  # still there to serve
        finally:
            own_s3.resume()
        two = _publish(bucket, tmp_path, "two")
        assert mirror.sync() is True and not mirror.stale and mirror.error is None
        assert modelrepo.read_index(mirror.root).entries["m"].version == two.version
    finally:
        mirror.close()

"""The repository contract: immutable versions, an atomic index under a lock, rollback, retention."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import modelrepo
from modelrepo import RepositoryError, read_index
from modelrepo.index import Index
from modelrepo.publish import versions


def _ir(folder: Path, payload: str = "weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "openvino_model.xml").write_text("<net/>")
    (folder / "openvino_model.bin").write_text(payload)
    return folder


def test_publish_writes_a_complete_version_then_the_index(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    entry = modelrepo.publish_version(repo, "merged_model", "merged", _ir(tmp_path / "ir"), {"built_by": "test"})
    assert (entry.name, entry.kind, entry.version, entry.path) == ("merged_model", "merged", 1, "merged_model/1")
    manifest = modelrepo.read_manifest(repo / "merged_model/1")
    assert manifest["version"] == 1 and manifest["built_by"] == "test"
    assert set(manifest["files"]) == {"openvino_model.xml", "openvino_model.bin", "graph.pbtxt"}
    assert modelrepo.verify_version(repo / "merged_model/1") == []
    assert read_index(repo).entries["merged_model"].version == 1
    config = json.loads((repo / "config.json").read_text())
    assert config == {"model_config_list": [{"config": {"name": "merged_model", "base_path": "merged_model/1"}}]}
    assert 'device: "CPU"' in (repo / "merged_model/1/graph.pbtxt").read_text()
    for name in ("index.json", "config.json"):  # readable by a server running as another user
        assert (repo / name).stat().st_mode & 0o777 == 0o644


def test_versions_grow_and_retention_keeps_what_the_index_names(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for i in range(5):
        modelrepo.publish_version(repo, "m", "base", _ir(tmp_path / f"ir{i}", str(i)), {}, retention=2)
    assert versions(repo, "m") == [4, 5]
    modelrepo.rollback(repo, "m")
    assert read_index(repo).entries["m"].version == 4
    modelrepo.publish_version(repo, "m", "base", _ir(tmp_path / "ir6"), {}, retention=1)
    assert versions(repo, "m") == [6]


def test_rollback_to_a_named_version_and_its_errors(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for i in range(3):
        modelrepo.publish_version(repo, "m", "base", _ir(tmp_path / f"ir{i}", str(i)), {})
    assert modelrepo.rollback(repo, "m", 1).version == 1
    with pytest.raises(RepositoryError, match="no version older than 1"):
        modelrepo.rollback(repo, "m")
    with pytest.raises(RepositoryError, match="no version 9"):
        modelrepo.rollback(repo, "m", 9)
    with pytest.raises(RepositoryError, match="not served"):
        modelrepo.rollback(repo, "other")


def test_cli_lists_rolls_back_and_verifies(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for i in range(2):
        modelrepo.publish_version(repo, "m", "merged", _ir(tmp_path / f"ir{i}", str(i)), {})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modelrepo", *args, "--repository", str(repo)],
                              capture_output=True, text=True, cwd=Path(__file__).parents[2])

    assert "live 2" in cli("list").stdout
    out = cli("rollback", "--model", "m")
    assert out.returncode == 0 and "m now serves version 1" in out.stdout
    assert cli("verify").returncode == 0
    (repo / "m/1/openvino_model.bin").write_text("tampered")
    bad = cli("verify")
    assert bad.returncode == 1 and "openvino_model.bin: sha256 differs" in bad.stdout


def check_staging(repo: str | Path, tmp_path: Path) -> None:
    """A staged version is complete and kept, not live, until promoted; a newer live one supersedes it."""
    store = modelrepo.open_store(repo)
    modelrepo.publish_version(repo, "m", "merged", _ir(tmp_path / "ir1", "1"), {})
    staged = modelrepo.publish_version(repo, "m", "merged", _ir(tmp_path / "ir2", "2"), {}, stage=True, retention=1)
    index = read_index(repo)
    assert index.entries["m"].version == 1 and index.staged["m"] == staged and staged.version == 2
    assert store.versions("m") == [1, 2]  # retention 1, but the index names both
    assert store.verify_version("m/2") == []
    assert Index.from_json(index.to_json()) == index
    promoted = modelrepo.promote(repo, "m")
    index = read_index(repo)
    assert promoted.version == 2 and index.entries["m"] == promoted and not index.staged
    with pytest.raises(RepositoryError, match="no staged version"):
        modelrepo.promote(repo, "m")
    modelrepo.publish_version(repo, "m", "merged", _ir(tmp_path / "ir3", "3"), {}, stage=True)
    modelrepo.publish_version(repo, "m", "merged", _ir(tmp_path / "ir4", "4"), {})
    assert read_index(repo).entries["m"].version == 4 and not read_index(repo).staged  # 3 will never be promoted
    with pytest.raises(RepositoryError, match="is served as a merged model"):
        modelrepo.publish_version(repo, "m", "base", _ir(tmp_path / "ir5"), {}, stage=True)


def test_a_staged_version_is_kept_and_not_live_until_promoted(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    check_staging(repo, tmp_path)
    modelrepo.publish_version(repo, "m", "merged", _ir(tmp_path / "ir6", "6"), {}, stage=True)
    config = json.loads((repo / "config.json").read_text())  # OpenVINO Model Server serves the live version
    assert config["model_config_list"][0]["config"]["base_path"] == "m/4"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modelrepo", *args, "--repository", str(repo)],
                              capture_output=True, text=True, cwd=Path(__file__).parents[2])

    assert "live 4\tstaged 5" in cli("list").stdout
    assert "m/5: ok" in cli("verify").stdout  # staged versions are checked too
    out = cli("promote", "--model", "m")
    assert out.returncode == 0 and "m now serves version 5" in out.stdout
    assert cli("promote", "--model", "m").returncode == 2
    modelrepo.publish_version(repo, "first", "base", _ir(tmp_path / "first"), {}, stage=True)
    assert "first\tbase\tnot live\tstaged 1" in cli("list").stdout  # a name only staged is listed


def test_adapter_entries_name_a_served_base(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(RepositoryError, match="base 'base_model' is not a served model"):
        modelrepo.publish_version(repo, "sql", "adapter", _ir(tmp_path / "a"), {}, base="base_model", alpha=2.0)
    assert read_index(repo).entries == {}
    modelrepo.publish_version(repo, "base_model", "base", _ir(tmp_path / "b"), {})
    e = modelrepo.publish_version(repo, "sql", "adapter", _ir(tmp_path / "a"), {}, base="base_model", alpha=2.0)
    assert (e.base, e.alpha) == ("base_model", 2.0)
    assert not (repo / "sql/1/graph.pbtxt").exists()
    config = json.loads((repo / "config.json").read_text())
    assert [m["config"]["name"] for m in config["model_config_list"]] == ["base_model"]
    with pytest.raises(RepositoryError, match="base of adapters"):
        modelrepo.remove_entry(repo, "base_model")
    modelrepo.remove_entry(repo, "sql")
    assert set(read_index(repo).entries) == {"base_model"}


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "..", ".hidden", "", "x" * 129, "a..b"])
def test_names_that_could_leave_the_repository_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(RepositoryError, match="invalid model name"):
        modelrepo.publish_version(tmp_path / "repo", name, "base", _ir(tmp_path / "ir"), {})
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"models": {}}', "not a format-1 index"),
        ('{"format": 1, "models": {"../x": {"kind": "base", "version": 1}}}', "invalid model name"),
        ('{"format": 1, "models": {"m": {"kind": "base", "version": 0}}}', "version must be"),
        ('{"format": 1, "models": {"a": {"kind": "adapter", "version": 1, "base": "b", "alpha": 2}}}', "not a served"),
    ],
)
def test_a_broken_index_is_reported_not_guessed(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "index.json").write_text(text)
    with pytest.raises(RepositoryError, match=message):
        read_index(tmp_path)


def _publish_many(repo: str, name: str, n: int) -> None:
    for i in range(n):
        src = Path(repo).parent / f"src-{name}-{i}"
        _ir(src, f"{name}{i}")
        modelrepo.publish_version(repo, name, "merged", src, {})


def test_concurrent_publishers_lose_no_entry(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_publish_many, args=(str(repo), f"model_{k}", 4)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    index = read_index(repo)
    assert {n: e.version for n, e in index.entries.items()} == {"model_0": 4, "model_1": 4, "model_2": 4}
    assert index.generation == 12


_KILLED_PUBLISH = """
import os, signal, sys
from pathlib import Path
import modelrepo.publish as p
real = p._fsync_tree
def die(root):
    real(root)
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the copy, before the rename and the index
p._fsync_tree = die
p.publish_version(sys.argv[1], "m", "merged", sys.argv[2], {})
"""


def test_a_publish_killed_half_way_leaves_the_previous_version_live(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modelrepo.publish_version(repo, "m", "merged", _ir(tmp_path / "v1", "one"), {})
    before = (repo / "index.json").read_text()
    root = str(Path(__file__).parents[2])
    proc = subprocess.run([sys.executable, "-c", _KILLED_PUBLISH, str(repo), str(_ir(tmp_path / "v2", "two"))],
                          cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == -signal.SIGKILL
    assert (repo / "index.json").read_text() == before
    assert versions(repo, "m") == [1]
    assert any(p.name.startswith(".staging-") for p in (repo / "m").iterdir())  # swept later, never live
    # The next publish takes version 2 and works as usual.
    assert modelrepo.publish_version(repo, "m", "merged", _ir(tmp_path / "v3", "three"), {}).version == 2

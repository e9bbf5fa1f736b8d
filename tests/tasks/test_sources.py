"""Sources: local folders pinned by content, hub ids pinned to a commit, unsafe sources refused, retries, cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from demo.make_sources import DemoSources
from tasks.errors import SourceError, TransientSourceError
from tasks.sources import fetch, fetch_source, resolve, resolve_source, snapshot_path
from tasks.workdir import fresh_unless_present
from tests.tasks.hub import FakeHub
from tests.tasks.makers import pickled_adapter


@pytest.fixture
def hub(demo_sources: DemoSources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A loopback hub serving the demo folders; HF_ENDPOINT points at it, HF_HUB_CACHE is this test's own."""
    both = tmp_path / "both"
    shutil.copytree(demo_sources.sql_adapter, both)
    shutil.copy(pickled_adapter(demo_sources.sql_adapter, tmp_path / "pickled") / "adapter_model.bin", both)
    server = FakeHub()
    server.add("acme/tiny-base", main=demo_sources.base)
    server.add("acme/sql-lora", main=demo_sources.sql_adapter, v0=demo_sources.spell_adapter)
    server.add("acme/pickled-lora", main=tmp_path / "pickled")
    server.add("acme/both-lora", main=both)
    with server as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        yield server


def test_local_folder_is_pinned_by_a_hash_of_its_files(demo_sources: DemoSources, tmp_path: Path) -> None:
    copy = shutil.copytree(demo_sources.sql_adapter, tmp_path / "sql")
    first, again = resolve(str(copy), "adapter"), resolve(str(copy), "adapter")
    assert first.origin == "local" and first.revision.startswith("sha256:") and first.revision == again.revision
    (copy / "adapter_config.json").write_text(
        (copy / "adapter_config.json").read_text().replace('"r": 8', '"r": 8 '), encoding="utf-8"
    )
    assert resolve(str(copy), "adapter").revision != first.revision
    with pytest.raises(SourceError, match="changed while the build ran"):
        fetch(first)


def test_missing_local_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"base .*/nope: no such folder"):
        resolve(str(tmp_path / "nope"), "base")


def test_pickle_only_adapter_is_refused_without_the_flag(demo_sources: DemoSources, tmp_path: Path) -> None:
    folder = pickled_adapter(demo_sources.sql_adapter, tmp_path / "pickled")
    with pytest.raises(SourceError, match=r"only pickled weights \['adapter_model.bin'\].*--allow-pickle"):
        resolve(str(folder), "adapter")
    assert resolve(str(folder), "adapter", allow_pickle=True).origin == "local"


def test_custom_code_is_refused_without_the_flag(demo_sources: DemoSources, tmp_path: Path) -> None:
    base = shutil.copytree(demo_sources.base, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"auto_map .*refused without --trust-remote-code"):
        resolve(str(base), "base")
    (base / "modeling_evil.py").write_text("import os\n")
    with pytest.raises(SourceError, match=r"ships Python code \['modeling_evil.py'\]"):
        resolve(str(base), "base")
    assert resolve(str(base), "base", trust_remote_code=True).origin == "local"


def test_a_folder_of_the_wrong_kind_is_named(demo_sources: DemoSources) -> None:
    with pytest.raises(SourceError, match=r"adapter .* has no adapter_config.json"):
        resolve(str(demo_sources.base), "adapter")


def test_hub_id_is_pinned_to_its_commit_and_downloaded(hub: FakeHub, demo_sources: DemoSources) -> None:
    main = resolve("acme/sql-lora", "adapter")
    pinned = resolve("acme/sql-lora@v0", "adapter")
    assert main.origin == "hub" and len(main.revision) == 40 and main.repo_id == "acme/sql-lora"
    assert pinned.revision != main.revision and pinned.requested_revision == "v0"
    assert resolve(f"acme/sql-lora@{pinned.revision}", "adapter").revision == pinned.revision
    folder = fetch(main)
    assert folder.name == main.revision
    data = (folder / "adapter_model.safetensors").read_bytes()
    assert data == (demo_sources.sql_adapter / "adapter_model.safetensors").read_bytes()
    assert main.describe() == {
        "spec": "acme/sql-lora",
        "origin": "hub",
        "revision": main.revision,
        "repo_id": "acme/sql-lora",
        "requested_revision": "main",
    }
    assert "GET /api/models/acme/sql-lora/revision/v0" in hub.requests
    assert f"GET /acme/sql-lora/resolve/{main.revision}/adapter_model.safetensors" in hub.requests


def test_hub_download_leaves_pickles_out(hub: FakeHub) -> None:
    folder = fetch(resolve("acme/both-lora", "adapter"))
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "adapter_model.bin").exists()
    with pytest.raises(SourceError, match="only pickled weights"):
        resolve("acme/pickled-lora", "adapter")
    folder = fetch(resolve("acme/both-lora", "adapter", allow_pickle=True), allow_pickle=True)
    assert (folder / "adapter_model.bin").is_file()


def test_unknown_repo_or_revision_is_final_and_named(hub: FakeHub) -> None:
    with pytest.raises(SourceError, match=r"acme/nothing not found on http://127.0.0.1") as e:
        resolve("acme/nothing", "adapter")
    assert not isinstance(e.value, TransientSourceError)
    with pytest.raises(SourceError, match="revision 'v9' of acme/sql-lora not found") as e:
        resolve("acme/sql-lora@v9", "adapter")
    assert not isinstance(e.value, TransientSourceError)


def test_hub_server_errors_are_retried_by_prefect_and_not_found_is_not(hub: FakeHub, prefect_server: None) -> None:
    from prefect import flow

    @flow
    def resolve_twice() -> str:
        return resolve_source("acme/sql-lora", "adapter").revision

    hub.fail_next = 1  # the first request gets a 503
    assert len(resolve_twice()) == 40
    assert hub.requests.count("GET /api/models/acme/sql-lora") == 2  # the 503 and the retry

    @flow
    def resolve_missing() -> str:
        return resolve_source("acme/nothing", "adapter").revision

    hub.requests.clear()
    with pytest.raises(SourceError, match="not found"):
        resolve_missing()
    assert len(hub.requests) == 1  # not found is final: no retry


def test_fetch_is_cached_on_the_revision_until_the_copy_is_gone(hub: FakeHub, prefect_server: None) -> None:
    from prefect import flow

    @flow
    def fetch_again_and_after_deleting() -> list[str]:
        source = resolve_source("acme/sql-lora", "adapter")
        path = snapshot_path(source)
        names = [fresh_unless_present(fetch_source, path)(source, return_state=True).name for _ in range(2)]
        shutil.rmtree(path)
        gone = fresh_unless_present(fetch_source, path)(source, return_state=True)  # fetched again, not the cache
        assert gone.result() == path and path.is_dir()
        return [*names, gone.name]

    assert fetch_again_and_after_deleting() == ["Completed", "Cached", "Completed"]

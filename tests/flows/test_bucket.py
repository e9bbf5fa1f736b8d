"""The flows with an s3:// repository: build_model publishes into a bucket, publish_adapter validates on it."""

from __future__ import annotations

from pathlib import Path

import pytest

import modelrepo
from demo.make_sources import DemoSources
from flows.build_model import build_model
from flows.publish_adapter import publish_adapter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
SPELL_PROMPTS = Path(__file__).parents[2] / "demo" / "prompts" / "spell.jsonl"


def test_build_model_and_publish_adapter_into_a_bucket(demo_sources: DemoSources, bucket: str, work: Path) -> None:
    base = build_model(source_model=str(demo_sources.base), model_name="base_model", repository=bucket, work_dir=work)
    assert (base.version, base.published, base.path) == (1, True, f"{bucket}/base_model/1")
    store = modelrepo.open_store(bucket)
    assert store.verify_version("base_model/1") == []
    manifest = store.read_manifest("base_model/1")
    assert manifest["validation"]["passed"] and manifest["sources"]["base"]["spec"] == str(demo_sources.base)

    # The adapter is validated on a checked local copy of the base's version, and published beside it.
    adapter = publish_adapter(
        adapter=str(demo_sources.spell_adapter),
        base="base_model",
        name="spell_adapter",
        repository=bucket,
        prompts=SPELL_PROMPTS,
        work_dir=work,
    )
    entry = modelrepo.read_index(bucket).entries["spell_adapter"]
    assert (entry.kind, entry.base, entry.alpha, entry.version) == ("adapter", "base_model", 2.0, adapter.version)
    assert store.verify_version(entry.path) == []
    assert store.read_manifest(entry.path)["validation"]["passed"]
    assert modelrepo.read_index(bucket).generation == 2
    # Up to date the second time: nothing new published.
    again = build_model(source_model=str(demo_sources.base), model_name="base_model", repository=bucket, work_dir=work)
    assert (again.version, again.published) == (1, False)

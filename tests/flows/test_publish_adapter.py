"""The publish_adapter flow: an adapter validated at runtime on a published base, and each way it must fail."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import modelrepo
from demo.make_sources import DemoSources
from flows.publish_adapter import publish_adapter
from tasks.errors import AdapterMismatch, PipelineError, ValidationFailed
from tasks.publish import Published
from tests.tasks.makers import tiny_llama, untrained_adapter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
SPELL_PROMPTS = Path(__file__).parents[2] / "demo" / "prompts" / "spell.jsonl"


@pytest.fixture
def repo(flow_built_base: Published, tmp_path: Path) -> Path:
    """A copy of the flow-built repository serving base_model."""
    return Path(shutil.copytree(flow_built_base.path.parents[1], tmp_path / "models"))


def snapshot(repo: Path) -> dict[str, bytes]:
    return {p: (repo / p).read_bytes() for p in ("index.json", "config.json")}


def test_adapter_is_validated_at_runtime_and_published_with_its_base_and_scale(
    demo_sources: DemoSources, repo: Path, work: Path
) -> None:
    args = dict(
        adapter=str(demo_sources.spell_adapter),
        base="base_model",
        name="spell_adapter",
        repository=repo,
        prompts=SPELL_PROMPTS,
        work_dir=work,
    )
    published = publish_adapter(**args)
    entry = modelrepo.read_index(repo).entries["spell_adapter"]
    assert (entry.kind, entry.base, entry.alpha, entry.version) == ("adapter", "base_model", 2.0, published.version)
    assert sorted(p.name for p in published.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "validation.md",
    ]
    assert modelrepo.verify_version(published.path) == []
    manifest = modelrepo.read_manifest(published.path)
    assert manifest["adapter"]["scale"] == 2.0 and manifest["adapter"]["rank"] == 8
    assert manifest["sources"]["base"]["name"] == "base_model"
    validation = manifest["validation"]
    assert validation["passed"] and validation["kind"] == "adapter"
    assert validation["agreement"] >= validation["min_agreement"]
    assert validation["logprob_gap"] <= validation["bounds"]["max_logprob_gap"]
    # The adapter runs on the base's engine, so it is validated with the base's numerics.
    base_manifest = modelrepo.read_manifest(repo / "base_model" / "1")
    assert manifest["numerics"] == validation["numerics"] == base_manifest["numerics"]
    row = validation["rows"][0]
    # The runtime adapter spells the word as the prompt set's reference does; the base alone does not.
    assert row["model_output"] != row["base_output"] and "-" in row["model_output"]
    assert row["model_exact"] and not row["base_exact"]
    assert validation["scores"]["model_f1"] > validation["scores"]["base_f1"]
    # Not in OVMS's config.json: OVMS has no runtime adapters to list.
    assert "spell_adapter" not in (repo / "config.json").read_text()
    again = publish_adapter(**args)
    assert (again.version, again.published) == (published.version, False)


def test_adapter_for_another_base_fails_naming_the_mismatch(repo: Path, tmp_path: Path, work: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    before = snapshot(repo)
    other = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path / "narrow", hidden=64))
    lora = get_peft_model(other, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "narrow-lora")
    with pytest.raises(
        AdapterMismatch,
        match=r"does not fit base .*\(llama\): model\.layers\.0\.self_attn\.q_proj"
        r"\.lora_A is \[8, 64\], expected \[8, 128\]",
    ):
        publish_adapter(
            adapter=str(tmp_path / "narrow-lora"), base="base_model", name="narrow", repository=repo, work_dir=work
        )
    assert snapshot(repo) == before and not (repo / "narrow").exists()


def test_untrained_adapter_fails_validation_and_publishes_nothing(
    demo_sources: DemoSources, repo: Path, tmp_path: Path, work: Path
) -> None:
    before = snapshot(repo)
    zero = untrained_adapter(demo_sources.spell_adapter, tmp_path / "untrained")
    with pytest.raises(ValidationFailed, match=r"adapters change the greedy completion of only 0 of 6 prompts"):
        publish_adapter(
            adapter=str(zero),
            base="base_model",
            name="untrained",
            repository=repo,
            prompts=SPELL_PROMPTS,
            work_dir=work,
        )
    assert snapshot(repo) == before and not (repo / "untrained").exists()


def test_unknown_base_is_named_with_what_is_served(demo_sources: DemoSources, repo: Path) -> None:
    with pytest.raises(PipelineError, match=r"base 'llama' is not served in .*; served: \['base_model'\]"):
        publish_adapter(adapter=str(demo_sources.spell_adapter), base="llama", name="spell", repository=repo)


def test_command_line_failure_is_one_line(
    demo_sources: DemoSources, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.publish_adapter import main

    code = main(
        ["--adapter", str(demo_sources.spell_adapter), "--base", "merged", "--name", "spell", "--repository", str(repo)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1] == f"publish_adapter failed: base 'merged' is not served in {repo}; served: ['base_model']"

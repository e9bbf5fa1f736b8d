"""Merge: adapters that do not fit the base are named before peft loads them; adapters apply in order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from demo.make_sources import DemoSources
from tasks.errors import AdapterMismatch
from tasks.merge import check_adapter_fits, merge_adapters
from tests.tasks.makers import tiny_llama


def test_fitting_adapter_reports_rank_and_scale(demo_sources: DemoSources) -> None:
    fit = check_adapter_fits(demo_sources.base, demo_sources.sql_adapter)
    assert (fit.rank, fit.lora_alpha, fit.scale) == (8, 16.0, 2.0)
    assert fit.modules == 2 * 7  # seven linears in each of two layers
    assert "q_proj" in fit.target_modules


def test_adapter_for_a_base_of_another_width_names_module_and_shapes(demo_sources: DemoSources, tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "narrow", hidden=64)
    with pytest.raises(
        AdapterMismatch,
        match=r"does not fit base .*narrow \(llama\): model\.layers\.0\.\S+\.lora_B "
        r"is \[128, 8\], expected \[64, 8\] for a base weight of \[64, \d+\]",
    ):
        check_adapter_fits(base, demo_sources.sql_adapter)


def test_adapter_for_a_base_with_fewer_layers_names_the_missing_module(
    demo_sources: DemoSources, tmp_path: Path
) -> None:
    base = tiny_llama(tmp_path / "shallow", layers=1)
    with pytest.raises(
        AdapterMismatch,
        match=r"changes model\.layers\.1\.\S+, which the base does not have "
        r"\(the base has 1 layers\)",
    ):
        check_adapter_fits(base, demo_sources.sql_adapter)


def test_adapter_for_another_architecture_names_the_modules(demo_sources: DemoSources, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=4096)).save_pretrained(base)
    with pytest.raises(AdapterMismatch, match=r"\(gpt2\): target modules \[.*'q_proj'.*\] match no module of the base"):
        check_adapter_fits(base, demo_sources.sql_adapter)


def test_adapter_whose_rank_disagrees_with_its_config_is_named(demo_sources: DemoSources, tmp_path: Path) -> None:
    adapter = shutil.copytree(demo_sources.sql_adapter, tmp_path / "sql")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 4
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatch, match=r"lora_A is \[8, (\d+)\], expected \[4, \1\] .* at rank 4"):
        check_adapter_fits(demo_sources.base, adapter)


def test_adapters_merge_in_order_into_the_sum_of_their_deltas(demo_sources: DemoSources, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.merge import load_base, load_tokenizer
    from tasks.validate import _reference_model

    adapters = [demo_sources.sql_adapter, demo_sources.spell_adapter]
    merged = AutoModelForCausalLM.from_pretrained(merge_adapters(demo_sources.base, adapters, tmp_path / "m"))
    tok = load_tokenizer(demo_sources.base, None)
    reference = _reference_model(load_base(demo_sources.base, tok), adapters)
    ids = tok(
        "[user] Spell the word letter by letter.\n\n word: river [/user] [assistant]", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-4)
        with reference.disable_adapter():
            assert not torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-2)


def test_a_larger_tokenizer_grows_the_embeddings(demo_sources: DemoSources, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    rows = AutoConfig.from_pretrained(demo_sources.base).vocab_size
    tok = AutoTokenizer.from_pretrained(demo_sources.base)
    tok.add_tokens([f"<extra_{i}>" for i in range(rows - len(tok) + 10)])  # 10 more tokens than embedding rows
    tok.save_pretrained(tmp_path / "tok")
    out = merge_adapters(demo_sources.base, [demo_sources.sql_adapter], tmp_path / "m", tmp_path / "tok")
    assert AutoConfig.from_pretrained(out).vocab_size == len(tok) == rows + 10
    assert len(AutoTokenizer.from_pretrained(out)) == len(tok)

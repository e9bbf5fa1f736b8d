"""The gate's reference streamed layer by layer from the safetensors shards gives peft's whole-model numbers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from demo.make_sources import DemoSources
from tasks.loaders import load_tokenizer
from tasks.reference import PeftReference, StreamedReference, load_reference, streamed_needs
from tasks.report import DEFAULT_PROMPTS, load_prompts
from tasks.stream_merge import plan_stream_merge
from tests.tasks.makers import random_adapter, resaved

TOLERANCE = 1e-5  # issue 17: the streamed reference's logits within this of the whole-model reference's


def sequences(tokenizer: Any) -> tuple[list[list[int]], list[int]]:
    """The demo prompts followed by their expected completions (of different lengths: the batch is padded)."""
    prompts = load_prompts(DEFAULT_PROMPTS)
    ids = [tokenizer(p.prompt).input_ids for p in prompts]
    conts = [[*tokenizer(p.reference, add_special_tokens=False).input_ids, tokenizer.eos_token_id] for p in prompts]
    return [i + c for i, c in zip(ids, conts, strict=True)], [len(i) for i in ids]


def streamed(base: Path, adapters: list[Path], tokenizer: Any) -> StreamedReference:
    """Nothing kept between passes: every layer is read from disk for every forward pass."""
    return StreamedReference(plan_stream_merge(base, adapters, vocab_size=len(tokenizer)), tokenizer)


def weights_on_meta(reference: StreamedReference) -> bool:
    return all(p.is_meta for layer in reference._layers for p in layer.parameters())


@pytest.mark.parametrize("names", [[], ["sql"], ["sql", "spell"]], ids=["base", "one-adapter", "two-adapters"])
def test_streamed_logits_equal_the_whole_model_reference(demo_sources: DemoSources, names: list[str]) -> None:
    adapters = [getattr(demo_sources, f"{n}_adapter") for n in names]
    tokenizer = load_tokenizer(demo_sources.base, None)
    seqs, starts = sequences(tokenizer)
    whole = PeftReference(demo_sources.base, adapters, tokenizer).score(seqs, starts)
    reference = streamed(demo_sources.base, adapters, tokenizer)
    assert weights_on_meta(reference)
    layered = reference.score(seqs, starts)
    assert weights_on_meta(reference), "the decoder layers' weights stay loaded after the pass"

    for w, s in zip(whole, layered, strict=True):
        assert s.reference.shape == w.reference.shape
        assert np.abs(s.reference - w.reference).max() <= TOLERANCE
        if adapters:
            assert w.base is not None and s.base is not None
            assert np.abs(s.base - w.base).max() <= TOLERANCE
            # The adapters change the logits: the rows really were computed with and without them.
            assert np.abs(s.reference - s.base).max() > 0.1
        else:
            assert s.base is None


def test_streamed_reference_reads_a_sharded_16_bit_checkpoint(demo_sources: DemoSources, tmp_path: Path) -> None:
    """bf16 shards, each layer split across files: read per layer, converted to f32 as from_pretrained does."""
    base = resaved(demo_sources.base, tmp_path / "bf16", dtype="bfloat16", max_shard_size="300KB")
    assert len(list(base.glob("model-*.safetensors"))) > 2
    adapter = random_adapter(base, tmp_path / "adapter", targets=("q_proj", "v_proj", "down_proj"))
    tokenizer = load_tokenizer(base, None)
    seqs, starts = sequences(tokenizer)
    whole = PeftReference(base, [adapter], tokenizer).score(seqs, starts)
    layered = streamed(base, [adapter], tokenizer).score(seqs, starts)
    for w, s in zip(whole, layered, strict=True):
        assert np.abs(s.reference - w.reference).max() <= TOLERANCE
        assert s.base is not None and w.base is not None
        assert np.abs(s.base - w.base).max() <= TOLERANCE


def test_streamed_greedy_base_is_peft_greedy_where_the_choice_is_clear(demo_sources: DemoSources) -> None:
    """All prompts in one left-padded batch give each prompt's own greedy answer, but for near-ties.

    Batching changes the float summation order; where the top two logits of the base's own path lie
    within 1e-3, either choice is right, so those prompts are not compared.
    """
    adapters = [demo_sources.sql_adapter]
    tokenizer = load_tokenizer(demo_sources.base, None)
    prompts = [tokenizer(p.prompt).input_ids for p in load_prompts(DEFAULT_PROMPTS)]
    whole = PeftReference(demo_sources.base, adapters, tokenizer)
    expected = whole.greedy_base(prompts, 16)
    got = streamed(demo_sources.base, adapters, tokenizer).greedy_base(prompts, 16)

    paths = whole.score([p + e for p, e in zip(prompts, expected, strict=True)], [len(p) for p in prompts])
    compared = 0
    for ids, want, have, score in zip(prompts, expected, got, paths, strict=True):
        assert score.base is not None
        top2 = np.sort(score.base, axis=-1)[:, -2:]
        if (top2[:, 1] - top2[:, 0]).min() > 1e-3:
            assert have == want, tokenizer.decode(ids)
            compared += 1
    assert compared >= len(prompts) // 2
    assert any(want != [] for want in expected)


def test_scoring_keeps_no_layer_and_generating_keeps_what_its_budget_allows(demo_sources: DemoSources) -> None:
    tokenizer = load_tokenizer(demo_sources.base, None)
    plan = plan_stream_merge(demo_sources.base, [demo_sources.sql_adapter], vocab_size=len(tokenizer))
    one_layer = sum(p.numel() * 4 for p in streamed(demo_sources.base, [], tokenizer)._layers[0].parameters())
    reference = StreamedReference(plan, tokenizer, resident_bytes=one_layer)
    seqs, starts = sequences(tokenizer)
    first = reference.score(seqs, starts)
    layers = reference._layers
    assert all(p.is_meta for layer in layers for p in layer.parameters())  # one pass: nothing to keep
    answers = reference.greedy_base([seqs[0][: starts[0]]], 8)
    assert not any(p.is_meta for p in layers[0].parameters())
    assert all(p.is_meta for layer in layers[1:] for p in layer.parameters())
    for a, b in zip(first, reference.score(seqs, starts), strict=True):  # the kept layer serves the next pass
        assert np.array_equal(a.reference, b.reference)
    assert reference.greedy_base([seqs[0][: starts[0]]], 8) == answers


def test_sources_it_cannot_stream_fall_back_to_peft_and_say_why(
    demo_sources: DemoSources, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    caplog.set_level(logging.INFO, logger="tasks.reference")
    rows = AutoConfig.from_pretrained(demo_sources.base).vocab_size
    tok = AutoTokenizer.from_pretrained(demo_sources.base)
    tok.add_tokens([f"<extra_{i}>" for i in range(rows - len(tok) + 10)])  # more tokens than embedding rows
    reference = load_reference(demo_sources.base, [demo_sources.sql_adapter], tok)
    assert isinstance(reference, PeftReference)
    assert f"not streamed: the tokenizer has {rows + 10} tokens and the embeddings {rows} rows" in caplog.text

    caplog.clear()
    tokenizer = load_tokenizer(demo_sources.base, None)
    assert isinstance(load_reference(demo_sources.base, [demo_sources.sql_adapter], tokenizer), StreamedReference)
    assert "streamed layer by layer" in caplog.text


def test_streamed_need_is_the_parts_outside_the_layers_and_two_layers(demo_sources: DemoSources) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_sources.base)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    outside = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)
    need = streamed_needs(demo_sources.base)
    assert need - 4 * (outside + 2 * layer) == pytest.approx(0.5e9)

"""Validation: prompt sets are checked, and an IR that is not the reference's build fails with the numbers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from demo.data import REFERENCE_PROMPT
from demo.make_sources import DemoSources
from modelrepo.numerics import default_numerics
from tasks.engine import genai_greedy, genai_pipeline
from tasks.errors import SourceError
from tasks.export import export_openvino
from tasks.gate import bounds_for, margin_disagreements
from tasks.loaders import load_tokenizer
from tasks.merge import merge_adapters
from tasks.reference import PeftReference
from tasks.report import DEFAULT_PROMPTS, MAX_NEW_TOKENS, load_prompts
from tasks.stream_merge import plan_stream_merge
from tasks.validate import (
    base_choices,
    subtractable_scales,
    subtracted_base_answers,
    validate_ir,
)
from tests.support import DemoRepository
from tests.tasks.makers import tiny_llama


def test_shipped_prompt_sets_match_the_demo_generator(demo_sources: DemoSources) -> None:
    assert DEFAULT_PROMPTS.read_text() == demo_sources.sql_prompts.read_text()
    assert (DEFAULT_PROMPTS.parent / "spell.jsonl").read_text() == demo_sources.spell_prompts.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "a"}\nnot json\n', r"line 2: not JSON"),
        ('{"question": "a"}\n', r'line 1: expected \{"prompt": str, "reference": str\}'),
        ('{"prompt": "a", "reference": 3}\n', r"line 1: reference must be a string, got int"),
        ("\n\n", r"holds no prompts"),
    ],
)
def test_bad_prompt_set_is_named_with_its_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(SourceError, match=message):
        load_prompts(path)


def test_prompts_without_reference_use_the_reference_models_continuation(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "[user] hello [/user] [assistant]"}\n')
    assert load_prompts(path)[0].reference is None


def test_an_ir_of_another_merge_fails_against_the_peft_reference(demo_repository: DemoRepository) -> None:
    src = demo_repository.sources
    # merged_model is base + sql; checked as if it were base + spell.
    report = validate_ir(
        demo_repository.root / "merged_model" / "1",
        src.base,
        [src.spell_adapter],
        src.spell_prompts,
        "fp16",
        default_numerics(),
    )
    assert not report.passed
    assert report.agreement < report.bounds.min_agreement and report.kld_mean > report.bounds.max_kld_mean
    assert "agrees with the PEFT reference on" in report.failures[0]
    # Subtracting spell from base + sql leaves sql: the check sees it, and the reference answers for the base.
    assert report.base_answers.startswith("the torch reference (at the ") and "base's 0 times" in report.base_answers
    assert len(report.table()) == 6 and set(report.table()[0]) >= {
        "prompt",
        "base output",
        "merged output",
        "agreement",
    }


def test_a_faithful_export_passes_with_its_figures_in_the_report(demo_repository: DemoRepository) -> None:
    src = demo_repository.sources
    numerics = default_numerics()
    report = validate_ir(
        demo_repository.root / "merged_model" / "1", src.base, [src.sql_adapter], src.sql_prompts, "fp16", numerics
    )
    assert report.passed, report.failures
    assert report.numerics == numerics.to_json()
    assert report.bounds == bounds_for("merged", "fp16", numerics.inference_precision)
    summary = report.summary()
    assert summary["kld_mean"] <= summary["bounds"]["max_kld_mean"] and summary["tokens"] > 50
    assert summary["scores"]["model_f1"] > summary["scores"]["base_f1"]
    assert summary["base_answers"].startswith("the engine: the IR with the adapters subtracted at runtime")


@pytest.mark.parametrize("adapters", [["sql"], ["sql", "spell"]])
def test_the_ir_with_its_adapters_subtracted_answers_as_the_base(
    demo_sources: DemoSources, tmp_path: Path, adapters: list[str]
) -> None:
    """Every token of the engine's base answers is the torch base's greedy choice, wherever it has one by tau."""
    src, numerics = demo_sources, default_numerics()
    adapter_dirs = [src.root / "adapters" / a for a in adapters]
    tokenizer = load_tokenizer(src.base, None)
    ir = export_openvino(merge_adapters(src.base, adapter_dirs, tmp_path / "merged"), tmp_path / "ir", "fp16").folder
    prompts = [tokenizer(p.prompt).input_ids for p in load_prompts(src.sql_prompts) + load_prompts(src.spell_prompts)]
    scales = subtractable_scales(plan_stream_merge(src.base, adapter_dirs, vocab_size=len(tokenizer)), adapter_dirs)
    assert isinstance(scales, dict) and list(scales) == adapter_dirs
    answers = subtracted_base_answers(ir, numerics, scales, prompts, MAX_NEW_TOKENS)
    torch_base = PeftReference(src.base, [], tokenizer)
    tau = bounds_for("merged", "fp16", numerics.inference_precision).tau
    for ids, answer in zip(prompts, answers, strict=True):
        logits = torch_base.score([ids + answer], [len(ids)])[0].reference
        assert not margin_disagreements(logits, np.array(answer), tau).any(), tokenizer.decode(answer)

    # Checked as validate_ir checks them, along the merged model's answers: the base's answers take the
    # base's choices, the merged model's (the adapters subtracted at scale 0) do not.
    merged = genai_greedy(genai_pipeline(ir, numerics), prompts, MAX_NEW_TOKENS)
    scores = PeftReference(src.base, adapter_dirs, tokenizer).score(
        [ids + m for ids, m in zip(prompts, merged, strict=True)], [len(ids) for ids in prompts]
    )

    def choices(candidates: list[list[int]]) -> list[int]:
        counts = [base_choices(a, m, s.base, s.reference) for a, m, s in zip(candidates, merged, scores, strict=True)]
        return [sum(c[i] for c in counts) for i in range(3)]

    differ, took_base, took_adapted = choices(answers)
    assert differ >= len(prompts) // 2 and took_base == differ and took_adapted == 0
    not_subtracted = subtracted_base_answers(ir, numerics, dict.fromkeys(scales, 0.0), prompts, MAX_NEW_TOKENS)
    _, took_base, took_adapted = choices(not_subtracted)
    assert not_subtracted == merged and took_adapted > took_base


def test_adapters_the_engine_cannot_subtract_are_named(demo_sources: DemoSources, tmp_path: Path) -> None:
    adapter = shutil.copytree(demo_sources.sql_adapter, tmp_path / "patterned")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"q_proj": 2 * config["lora_alpha"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(demo_sources.base, None)
    why = subtractable_scales(plan_stream_merge(demo_sources.base, [adapter], vocab_size=len(tokenizer)), [adapter])
    assert why == f"{adapter} scale their modules differently (rank or alpha pattern)"


def _scaled_adapter(src: Path, dest: Path, keep: Callable[[str], float]) -> Path:
    """A copy of the adapter whose lora_B matrices are multiplied by keep(key): a merge that is wrong on purpose."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(dest / "adapter_model.safetensors")
    scaled = {k: v * keep(k) if ".lora_B." in k else v for k, v in weights.items()}
    save_file(scaled, dest / "adapter_model.safetensors")
    return dest


def _noisy_model(model_dir: Path, dest: Path, relative: float) -> Path:
    """The merged model with gaussian noise of `relative` times each weight's mean magnitude added."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * relative * p.abs().mean())
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dest)
    return dest


@pytest.mark.slow
@pytest.mark.parametrize(
    "wrong",
    ["adapter at half scale", "adapter of layer 0 dropped", "weights + 10% noise"],
)
def test_an_export_wrong_on_purpose_is_refused(demo_sources: DemoSources, tmp_path: Path, wrong: str) -> None:
    """Exports the numerics calibration measured as wrong (tasks/gate.py) fail the gate on the numbers."""
    src = demo_sources
    if wrong == "adapter at half scale":
        adapter = _scaled_adapter(src.sql_adapter, tmp_path / "half", lambda k: 0.5)
        merged = merge_adapters(src.base, [adapter], tmp_path / "merged")
    elif wrong == "adapter of layer 0 dropped":
        adapter = _scaled_adapter(src.sql_adapter, tmp_path / "no-layer-0", lambda k: 0.0 if ".layers.0." in k else 1.0)
        merged = merge_adapters(src.base, [adapter], tmp_path / "merged")
    else:
        faithful = merge_adapters(src.base, [src.sql_adapter], tmp_path / "faithful")
        merged = _noisy_model(faithful, tmp_path / "merged", 0.1)
    ir = export_openvino(merged, tmp_path / "ir", "fp16").folder
    report = validate_ir(ir, src.base, [src.sql_adapter], src.sql_prompts, "fp16", default_numerics())
    assert not report.passed
    b = report.bounds
    assert report.agreement < b.min_agreement or report.kld_mean > b.max_kld_mean, report.summary()
    assert any("KL divergence" in f or "agrees with the PEFT reference" in f for f in report.failures)


def test_the_base_answer_after_an_adapter_request_is_the_fresh_base_answer(demo_repository: DemoRepository) -> None:
    """The validation pipeline's prefix cache is off: a base request does not reuse the adapter's cached prompt."""
    import openvino_genai
    from transformers import AutoTokenizer

    src, numerics = demo_repository.sources, default_numerics()
    base_ir = demo_repository.root / "base_model" / "1"
    ids = AutoTokenizer.from_pretrained(src.base)(REFERENCE_PROMPT).input_ids
    adapter = openvino_genai.Adapter(str(src.sql_adapter / "adapter_model.safetensors"))
    pipe = genai_pipeline(base_ir, numerics, adapters=openvino_genai.AdapterConfig(adapter))
    [with_adapter] = genai_greedy(pipe, [ids], 24, openvino_genai.AdapterConfig(adapter, 2.0))
    [base_after] = genai_greedy(pipe, [ids], 24, openvino_genai.AdapterConfig())
    [fresh] = genai_greedy(genai_pipeline(base_ir, numerics), [ids], 24)
    assert with_adapter != fresh
    assert base_after == fresh


@pytest.mark.slow
def test_a_faithful_export_of_a_random_weight_model_passes(demo_sources: DemoSources, tmp_path: Path) -> None:
    """Random weights give flat distributions full of near-ties (as the benchmark's model): no reason to refuse."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_llama(tmp_path / "random", layers=3)
    AutoTokenizer.from_pretrained(demo_sources.base).save_pretrained(base)
    # init_lora_weights=False: lora_B random too, so the adapter changes the weights (as the benchmark's adapters).
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    lora.save_pretrained(tmp_path / "random-lora")
    # No references: a random model scores its own greedy continuations, and has no task to be scored on.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in load_prompts(demo_sources.sql_prompts)))
    for adapters in ([], [tmp_path / "random-lora"]):
        model = merge_adapters(base, adapters, tmp_path / f"merged-{len(adapters)}") if adapters else base
        ir = export_openvino(model, tmp_path / f"ir-{len(adapters)}", "fp16").folder
        report = validate_ir(
            ir, base, adapters, prompts, "fp16", default_numerics(), min_changed_fraction=0.0
        )
        assert report.passed, report.failures
        assert report.kld_mean is not None and report.kld_mean <= report.bounds.max_kld_mean

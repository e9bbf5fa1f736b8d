"""Validate a runtime LoRA adapter on its served base's IR (openvino-genai) against the PEFT reference and the base."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import ValidationFailed
from tasks.logs import step_logger
from tasks.merge import load_base, load_tokenizer
from tasks.validate import (
    MAX_NEW_TOKENS,
    Row,
    ValidationReport,
    _greedy,
    _reference_model,
    load_prompts,
    publish_report,
)

# Largest difference of the greedy token's log-probability between the engine with the runtime
# adapter and the PEFT reference. Measured on the demo model (sql / spell adapter): fp16 base
# 0.001 / 0.008, int8 0.009 / 0.13, int4 0.094 / 0.25 (top-1 agreement 1.0, 1.0, 0.986).
MAX_LOGPROB_GAP: dict[str, float] = {"fp32": 0.02, "fp16": 0.05, "int8": 0.5, "int4": 1.0}


def validate_runtime_adapter(
    base_ir: Path,
    base_dir: Path,
    adapter_dir: Path,
    scale: float,
    prompts_path: Path,
    weight_format: str,
    tokenizer_dir: Path | None = None,
    *,
    min_changed_fraction: float = 0.5,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> ValidationReport:
    """Run the base's IR with the adapter applied at runtime, as the server will, and compare.

    Against the PEFT reference: teacher-forced top-1 agreement over each prompt's reference
    continuation, one engine step a position (the engine returns no full logits), and the
    log-probability gap of the chosen tokens. Against the base: the same engine with no adapter must
    give another greedy completion on enough prompts.
    """
    import numpy as np
    import openvino as ov
    import openvino_genai
    import torch

    log = step_logger(__name__)
    prompts = load_prompts(prompts_path)
    tokenizer = load_tokenizer(base_dir, tokenizer_dir)
    reference = _reference_model(load_base(base_dir, tokenizer), [adapter_dir])
    adapter = openvino_genai.Adapter(str(adapter_dir / "adapter_model.safetensors"))
    # Every adapter must be registered when the pipeline is built; the scale is passed explicitly,
    # since openvino-genai ignores adapter_config.json.
    pipe = openvino_genai.LLMPipeline(str(base_ir), "CPU", adapters=openvino_genai.AdapterConfig(adapter))
    on, off = openvino_genai.AdapterConfig(adapter, scale), openvino_genai.AdapterConfig()
    step = openvino_genai.GenerationConfig()
    step.max_new_tokens, step.do_sample, step.logprobs = 1, False, 1
    step.adapters = on
    greedy = openvino_genai.GenerationConfig()
    greedy.max_new_tokens, greedy.do_sample, greedy.apply_chat_template = max_new_tokens, False, False

    rows: list[Row] = []
    agree_total = tokens_total = 0
    for i, p in enumerate(prompts, 1):
        ids = tokenizer(p.prompt).input_ids
        with torch.no_grad():
            ref_ids = _greedy(reference, tokenizer, torch.tensor([ids]), max_new_tokens)
            if p.reference is not None:
                cont = [*tokenizer(p.reference, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
            else:
                cont = ref_ids
            full = torch.tensor([ids + cont])
            logprobs = torch.log_softmax(reference(input_ids=full).logits[0].float(), -1)
        agree, gap = 0, 0.0
        for k in range(len(cont)):
            prefix = ids + cont[:k]
            out = pipe.generate(ov.Tensor(np.array([prefix], dtype=np.int64)), step)
            token, score = int(out.tokens[0][0]), float(out.scores[0])
            position = len(prefix) - 1  # logits at t predict token t + 1
            agree += int(token == int(logprobs[position].argmax()))
            gap = max(gap, abs(score - float(logprobs[position, token])))
        greedy.adapters = on
        adapter_text = str(pipe.generate(p.prompt, greedy))
        greedy.adapters = off
        base_text = str(pipe.generate(p.prompt, greedy))
        ref_text = tokenizer.decode(ref_ids, skip_special_tokens=True)
        rows.append(
            Row(
                p.prompt,
                base_text,
                ref_text,
                adapter_text,
                agree / len(cont),
                len(cont),
                gap,
                gap,
                adapter_text != base_text,
            )
        )
        agree_total += agree
        tokens_total += len(cont)
        log.info("validated prompt %d/%d: agreement %.3f, log-prob gap %.3g", i, len(prompts), agree / len(cont), gap)
    return ValidationReport.of_rows(
        "adapter",
        weight_format,
        prompts_path,
        rows,
        agree_total / tokens_total,
        max_gap=MAX_LOGPROB_GAP[weight_format],
        gap_measure="in the log-probability of the greedy token",
        min_changed_fraction=min_changed_fraction,
    )


def validate_adapter_step(
    base_ir: Path,
    base_dir: Path,
    adapter_dir: Path,
    scale: float,
    prompts_path: Path,
    weight_format: str,
    name: str,
    tokenizer_dir: Path | None = None,
) -> ValidationReport:
    """validate_runtime_adapter, the report published as artifacts, and a failed validation raised."""
    report = validate_runtime_adapter(base_ir, base_dir, adapter_dir, scale, prompts_path, weight_format, tokenizer_dir)
    publish_report(report, name)
    if not report.passed:
        raise ValidationFailed("validation failed: " + "; ".join(report.failures))
    return report


# Not cached: it is cheap (seconds), and its inputs include a served folder that may be rolled back.
validate_adapter = task(name="validate-adapter", task_run_name="validate-{name}", cache_policy=NO_CACHE)(
    validate_adapter_step
)

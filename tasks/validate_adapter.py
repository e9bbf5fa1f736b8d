"""Validate a runtime LoRA adapter on its served base's IR (openvino-genai) against the PEFT reference and the base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from modelrepo import ADAPTER_WEIGHTS
from modelrepo.mapped import released_pages
from modelrepo.numerics import Numerics
from tasks.engine import genai_generate, genai_greedy, genai_pipeline
from tasks.gate import log_softmax
from tasks.loaders import load_tokenizer
from tasks.logs import step_logger
from tasks.reference import load_reference
from tasks.report import MAX_NEW_TOKENS, Row, Validation, ValidationReport, continuation


def validate_runtime_adapter(
    base_ir: Path,
    base_dir: Path,
    adapter_dir: Path,
    scale: float,
    prompts_path: Path,
    weight_format: str,
    numerics: Numerics,
    tokenizer_dir: Path | None = None,
    *,
    min_changed_fraction: float = 0.5,
    max_new_tokens: int = MAX_NEW_TOKENS,
    publish_as: str | None = None,
) -> ValidationReport:
    """Run the base's IR with the adapter applied at runtime, as the server will (same numerics), and compare.

    Against the PEFT reference: margin-aware top-1 agreement over each prompt's expected
    continuation (else the engine's own), one engine step a position, all in one batch (the engine
    returns no full logits), and the log-probability gap of the chosen tokens. Against the base:
    the same pipeline with no adapter, whose prefix cache is off (it is not keyed by adapter).
    With `publish_as` (the flow's step), the report becomes that adapter's artifacts and a failure raises.
    """
    import openvino_genai

    log = step_logger(__name__)
    validation = Validation.start("adapter", prompts_path, weight_format, numerics)
    prompts = validation.prompts
    tokenizer = load_tokenizer(base_dir, tokenizer_dir)
    adapter = openvino_genai.Adapter(str(adapter_dir / ADAPTER_WEIGHTS))
    # The IR's mapped weights released as the engine copies them (modelrepo/mapped.py).
    with released_pages([base_ir / "openvino_model.bin"]):
        # Every adapter must be registered when the pipeline is built; the scale is passed explicitly,
        # since openvino-genai ignores adapter_config.json.
        pipe = genai_pipeline(base_ir, numerics, adapters=openvino_genai.AdapterConfig(adapter))
        detokenizer = pipe.get_tokenizer()
        on, off = openvino_genai.AdapterConfig(adapter, scale), openvino_genai.AdapterConfig()
        step = openvino_genai.GenerationConfig()
        step.max_new_tokens, step.do_sample, step.logprobs = 1, False, 1
        step.adapters = on

        # The engine first, then the torch reference: one model in memory at a time. Each engine call is
        # one continuously batched generate over all prompts (or all teacher-forced prefixes).
        prompt_ids = [tokenizer(p.prompt).input_ids for p in prompts]
        model_ids = genai_greedy(pipe, prompt_ids, max_new_tokens, on)
        base_ids = genai_greedy(pipe, prompt_ids, max_new_tokens, off)
        conts = [continuation(tokenizer, p, m) for p, m in zip(prompts, model_ids, strict=True)]
        pairs = enumerate(zip(prompt_ids, conts, strict=True))
        prefixes = [(i, ids + cont[:k]) for i, (ids, cont) in pairs for k in range(len(cont))]
        tokens: list[list[int]] = [[] for _ in prompts]
        chosen: list[list[float]] = [[] for _ in prompts]
        for (i, _), out in zip(prefixes, genai_generate(pipe, [ids for _, ids in prefixes], step), strict=True):
            tokens[i].append(int(out.m_generation_ids[0][0]))
            chosen[i].append(float(out.m_scores[0]))
        model_texts = [str(detokenizer.decode(m)) for m in model_ids]
        base_texts = [str(detokenizer.decode(b)) for b in base_ids]
        del pipe, detokenizer
    reference = load_reference(base_dir, [adapter_dir], tokenizer)
    all_scores = reference.score(
        [ids + cont for ids, cont in zip(prompt_ids, conts, strict=True)], [len(ids) for ids in prompt_ids]
    )
    del reference

    rows: list[Row] = []
    for i, (p, cont, score, top, logp, model_text, base_text) in enumerate(
        zip(prompts, conts, all_scores, tokens, chosen, model_texts, base_texts, strict=True), 1
    ):
        logprobs = log_softmax(score.reference)
        gap = max(abs(s - float(logprobs[k, t])) for k, (t, s) in enumerate(zip(top, logp, strict=True)))
        row = validation.row(p, cont, score, np.array(top), base_text, model_text, logprob_gap=gap)
        rows.append(row)
        log.info("validated prompt %d/%d: agreement %.3f, log-prob gap %.3g", i, len(prompts), row.agreement, gap)
    return validation.report(
        rows,
        [],
        min_changed_fraction=min_changed_fraction,
        base_answers="the engine: the base's IR with no adapter",
        publish_as=publish_as,
    )


# Not cached: it is cheap (seconds), and its inputs include a served folder that may be rolled back.
validate_adapter = task(name="validate-adapter", task_run_name="validate-{publish_as}", cache_policy=NO_CACHE)(
    validate_runtime_adapter
)

"""Validate an exported IR before it is published: against the PEFT reference in torch, and against the base.

The gate's measures and bounds are in tasks/gate.py. What is measured is what will be served: the
IR is compiled with the version's pinned numerics (modelrepo/numerics.py), and the build fails
early where this CPU cannot compute them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from modelrepo import ADAPTER_WEIGHTS
from modelrepo.mapped import released_pages
from modelrepo.numerics import Numerics
from tasks.engine import genai_greedy, genai_pipeline, ir_logits, ir_request
from tasks.gate import kl_divergence
from tasks.loaders import load_tokenizer
from tasks.logs import step_logger
from tasks.reference import load_reference
from tasks.report import MAX_NEW_TOKENS, Row, Validation, ValidationReport, continuation
from tasks.resources import compiled_bytes_per_parameter, weights_size
from tasks.stream_merge import NotStreamable, StreamPlan, plan_stream_merge
from tasks.workdir import Step, file_digest


def subtractable_scales(plan: StreamPlan, adapter_dirs: list[Path]) -> dict[Path, float] | str:
    """Each adapter's one scale, when subtracting `scale * B @ A` at runtime undoes the merge; else why not.

    openvino-genai takes one scale an adapter and applies LoRA to linear layers only: so plain LoRA,
    one scale over all its modules (no rank or alpha pattern that varies it), no Conv1D.
    """
    scales: dict[Path, set[float]] = {a: set() for a in adapter_dirs}
    for deltas in plan.deltas.values():
        for d in deltas:
            if d.fan_in_fan_out:
                return f"{d.adapter} targets Conv1D weights"
            scales[d.adapter].add(d.scale)
    if several := [str(a) for a, s in scales.items() if len(s) > 1]:
        return f"{', '.join(several)} scale their modules differently (rank or alpha pattern)"
    return {a: next(iter(s), 0.0) for a, s in scales.items()}


def subtracted_base_answers(
    ir_dir: Path, numerics: Numerics, scales: dict[Path, float], prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """The base's greedy answers through the engine: the merged IR with each adapter subtracted at runtime.

    openvino-genai adds `alpha * B @ A` to the IR's weights: at alpha = -scale that is the base, up
    to the merged weights' rounding (the same size as the IR's own). One engine run instead of a
    streamed torch pass over the whole model per generated token.
    """
    import openvino_genai

    adapters = {a: openvino_genai.Adapter(str(a / ADAPTER_WEIGHTS)) for a in scales}
    registered, subtract = openvino_genai.AdapterConfig(), openvino_genai.AdapterConfig()
    for a, adapter in adapters.items():
        registered.add(adapter)
        subtract.add(adapter, -scales[a])
    return genai_greedy(genai_pipeline(ir_dir, numerics, adapters=registered), prompts, max_new_tokens, subtract)


def base_choices(
    answer: list[int], cont: list[int], base: np.ndarray, adapted: np.ndarray
) -> tuple[int, int, int]:
    """Where the reference's choices with and without the adapters differ: how often `answer` takes each.

    `base`, `adapted`: the reference's logits teacher-forced over `cont`, so they cover `answer` for as
    long as it follows `cont`, and at the first token where it leaves it. Returns (positions where
    the choices differ, of them where `answer` takes the base's, where it takes the adapted one). A
    base takes the base's more often; a model that still carries the adapters, the adapted one's.
    Near-ties the engine's own rounding flips (int8 on a flat random model flips many) land on
    either or neither.
    """
    differ = took_base = took_adapted = 0
    for k in range(min(len(answer), len(cont))):
        b, a = int(base[k].argmax()), int(adapted[k].argmax())
        if b != a:
            differ += 1
            took_base += answer[k] == b
            took_adapted += answer[k] == a
        if answer[k] != cont[k]:
            break
    return differ, took_base, took_adapted


def validate_ir(
    ir_dir: Path,
    base_dir: Path,
    adapter_dirs: list[Path],
    prompts_path: Path,
    weight_format: str,
    numerics: Numerics,
    tokenizer_dir: Path | None = None,
    *,
    min_changed_fraction: float = 0.5,
    max_new_tokens: int = MAX_NEW_TOKENS,
    publish_as: str | None = None,
    trust_remote_code: bool = False,
) -> ValidationReport:
    """Compare the IR with the torch reference position by position, and with the base.

    The IR's greedy continuation comes from openvino-genai with the pinned numerics (the serving
    path); the reference (tasks/reference.py, streamed layer by layer) and the IR then score the
    same tokens teacher-forced, with full logits. The base's own answers come from the engine, the
    adapters subtracted at runtime (subtracted_base_answers), checked against the reference where
    they follow the scored tokens (base_choices); where the engine cannot subtract them, or the
    check fails, from the reference itself (one streamed pass per token: slow on a large model).
    With `publish_as` (the flow's step), the report becomes that model's artifacts and a failure raises.
    """
    log = step_logger(__name__)
    validation = Validation.start("merged" if adapter_dirs else "base", prompts_path, weight_format, numerics)
    prompts = validation.prompts
    tokenizer = load_tokenizer(base_dir, tokenizer_dir, trust_remote_code=trust_remote_code)
    prompt_ids = [tokenizer(p.prompt).input_ids for p in prompts]

    # One model in memory at a time, each released before the next loads; the IR's mapped weights
    # released as the engine copies them (modelrepo/mapped.py), so they are not held twice.
    with released_pages([ir_dir / "openvino_model.bin"]):
        pipe = genai_pipeline(ir_dir, numerics)
        model_ids = genai_greedy(pipe, prompt_ids, max_new_tokens)
        detokenizer = pipe.get_tokenizer()
        model_texts = [str(detokenizer.decode(m)) for m in model_ids]
        del pipe, detokenizer
        conts = [continuation(tokenizer, p, m) for p, m in zip(prompts, model_ids, strict=True)]
        request = ir_request(ir_dir / "openvino_model.xml", numerics)
        engine_logits = [ir_logits(request, ids + c, len(ids)) for ids, c in zip(prompt_ids, conts, strict=True)]
        del request

        # The base's answers: for a base build, the candidate's own (the gate compares it with the reference).
        base_ids: list[list[int]] | None = model_ids
        base_answers = "the engine: the IR itself (a build of the base)"
        plan: StreamPlan | None = None
        if adapter_dirs:
            # Planned once: the scales here, the streamed reference below.
            try:
                plan = plan_stream_merge(
                    base_dir, adapter_dirs, vocab_size=len(tokenizer), trust_remote_code=trust_remote_code
                )
                scales = subtractable_scales(plan, adapter_dirs)
            except NotStreamable as e:
                scales = str(e)
            base_ids, why = None, scales if isinstance(scales, str) else ""
            if isinstance(scales, dict):
                try:
                    base_ids = subtracted_base_answers(ir_dir, numerics, scales, prompt_ids, max_new_tokens)
                except RuntimeError as e:
                    why = f"openvino-genai refused the adapters: {str(e).strip().splitlines()[0]}"
            base_answers = (
                "the engine: the IR with the adapters subtracted at runtime, checked against the reference"
                if base_ids is not None
                else f"the torch reference ({why}: the engine cannot subtract the adapters)"
            )
    # Layers stay loaded only if the reference generates (one pass per token), and no more than the IR held.
    compiled = weights_size(base_dir).parameters * compiled_bytes_per_parameter(weight_format)
    reference = load_reference(
        base_dir, adapter_dirs, tokenizer, resident_bytes=compiled, trust_remote_code=trust_remote_code, plan=plan
    )
    sequences = [ids + c for ids, c in zip(prompt_ids, conts, strict=True)]
    scores = reference.score(sequences, [len(ids) for ids in prompt_ids])
    log.info("scored %d continuations with the reference", len(sequences))
    if adapter_dirs and base_ids is not None:
        differ, took_base, took_adapted = np.sum(
            [base_choices(a, c, s.base, s.reference) for a, c, s in zip(base_ids, conts, scores, strict=True)], axis=0
        )
        if differ and took_base <= took_adapted:
            base_ids = None
            base_answers = (
                f"the torch reference (at the {differ} positions where the adapters change the reference's choice, "
                f"the engine's base answers take the base's {took_base} times, the adapted one {took_adapted})"
            )
    if base_ids is None:
        base_ids = reference.greedy_base(prompt_ids, max_new_tokens)
    log.info("the base's answers: %s", base_answers)
    del reference

    rows: list[Row] = []
    klds: list[float] = []
    for i, (p, cont, score, engine, model_text, base) in enumerate(
        zip(prompts, conts, scores, engine_logits, model_texts, base_ids, strict=True), 1
    ):
        kld = kl_divergence(score.reference, engine)
        base_text = tokenizer.decode(base, skip_special_tokens=True)
        rows.append(validation.row(p, cont, score, engine.argmax(-1), base_text, model_text, kld=kld))
        klds += kld.tolist()
        log.info(
            "validated prompt %d/%d: agreement %.3f, KLD mean %.2g", i, len(prompts), rows[-1].agreement, kld.mean()
        )
    return validation.report(
        rows, klds, min_changed_fraction=min_changed_fraction, base_answers=base_answers, publish_as=publish_as
    )


# What the report depends on beyond its inputs: the runtime it runs the IR on, the torch reference it
# compares with, and the gate's code (its bounds live there).
VALIDATE = Step(
    "validate",
    tools=("openvino", "openvino-genai", "openvino-tokenizers", "transformers", "tokenizers", "safetensors", "peft",
           "torch"),
    modules=("tasks.validate", "tasks.report", "tasks.engine", "tasks.gate", "tasks.reference", "tasks.loaders",
             "tasks.stream_merge",
             "modelrepo.numerics"),
)


def _validate_key(context: Any, parameters: dict[str, Any]) -> str | None:
    # The IR folder's name carries the hash of everything it was built from; the prompts count by content.
    ir_dir, prompts = Path(parameters["ir_dir"]), Path(parameters["prompts_path"])
    if not ir_dir.is_dir() or not prompts.is_file():
        return None
    return "validate-" + VALIDATE.key(
        str(ir_dir.resolve()),
        file_digest(prompts),
        parameters["weight_format"],
        parameters["numerics"].to_json(),
        parameters["publish_as"],
        [str(a) for a in parameters["adapter_dirs"]],
    )


validate = task(name="validate", task_run_name="validate", cache_key_fn=_validate_key, persist_result=True)(
    validate_ir
)

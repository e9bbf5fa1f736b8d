"""Validate an exported IR before it is published: against the PEFT reference in torch, and against the base.

The gate's measures and bounds are in tasks/gate.py. What is measured is what will be served: the
IR is compiled with the version's pinned numerics (modelrepo/numerics.py), and the build fails
early where this CPU cannot compute them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from modelrepo import ADAPTER_WEIGHTS
from modelrepo.mapped import released_pages
from modelrepo.numerics import Numerics, capabilities, effective, engine_properties
from tasks.errors import PipelineError, SourceError, ValidationFailed
from tasks.gate import Bounds, bounds_for, exact_match, kl_divergence, margin_disagreements, p99, token_f1
from tasks.logs import step_logger
from tasks.merge import load_tokenizer
from tasks.reference import Scores, load_reference
from tasks.resources import compiled_bytes_per_parameter, weights_size
from tasks.stream_merge import NotStreamable, StreamPlan, plan_stream_merge
from tasks.workdir import Step

# The shipped default prompt set: the reference demo's SQL prompt and five more in its format.
DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "demo" / "prompts" / "sql.jsonl"
MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class Prompt:
    prompt: str
    reference: str | None = None  # the expected completion; None: the engine's own greedy one is scored


@dataclass(frozen=True)
class Row:
    prompt: str
    base_output: str  # the base alone, greedy (ValidationReport.base_answers says from where)
    model_output: str  # the candidate through openvino-genai with the pinned numerics (the serving path), greedy
    tokens: int  # positions compared, teacher-forced
    agreement: float  # margin-aware top-1 agreement with the reference (gate.margin_disagreements)
    top1: float  # raw top-1 agreement, for the record
    kld_mean: float | None  # KL(reference || candidate) per position, mean and largest (None: no full logits)
    kld_max: float | None
    logprob_gap: float | None  # runtime adapters: the largest gap in the chosen token's log-probability
    changed: bool  # the adapters change the base's choice somewhere (beyond the gate's tau)
    reference: str | None = None  # the prompt set's expected completion, when it has one
    base_f1: float | None = None  # token F1 of base_output / model_output against it
    model_f1: float | None = None
    base_exact: bool | None = None
    model_exact: bool | None = None


@dataclass(frozen=True)
class ValidationReport:
    kind: str  # "merged" (IR of base + adapters), "base" (IR of the base alone), "adapter" (runtime adapter)
    weight_format: str
    numerics: dict[str, Any]  # what the version pins, and what this CPU computed with it
    effective: dict[str, Any]
    prompts: str
    rows: list[Row]
    bounds: Bounds
    agreement: float  # over all compared tokens
    top1: float
    kld_mean: float | None
    kld_p99: float | None
    logprob_gap: float | None
    changed: int
    min_changed: int
    base_answers: str  # where the rows' base outputs come from
    failures: list[str] = field(default_factory=list)

    @classmethod
    def of_rows(
        cls,
        kind: str,
        weight_format: str,
        numerics: Numerics,
        computed: Numerics,
        prompts: Path,
        rows: list[Row],
        klds: list[float],
        *,
        min_changed_fraction: float,
        base_answers: str,
    ) -> ValidationReport:
        """The report over `rows` (and every position's KLD), judged against the bounds of its format and numerics.

        `computed`: what this CPU computed with the pinned `numerics` (require_computable's answer).
        """
        tokens = sum(r.tokens for r in rows)
        gaps = [r.logprob_gap for r in rows if r.logprob_gap is not None]
        return cls(
            kind=kind,
            weight_format=weight_format,
            numerics=numerics.to_json(),
            effective=computed.to_json(),
            prompts=str(prompts),
            rows=rows,
            bounds=bounds_for(kind, weight_format, numerics.inference_precision),
            agreement=sum(r.agreement * r.tokens for r in rows) / tokens,
            top1=sum(r.top1 * r.tokens for r in rows) / tokens,
            kld_mean=float(np.mean(klds)) if klds else None,
            kld_p99=p99(klds) if klds else None,
            logprob_gap=max(gaps) if gaps else None,
            changed=sum(r.changed for r in rows),
            min_changed=min_changed(len(rows), min_changed_fraction),
            base_answers=base_answers,
        ).judge()

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def adapters(self) -> bool:
        return self.kind != "base"

    @property
    def reference(self) -> str:
        return "the PEFT reference" if self.adapters else "the torch base"

    @property
    def output_label(self) -> str:
        return {"merged": "merged output", "base": "exported output", "adapter": "adapter output"}[self.kind]

    @property
    def what(self) -> str:
        return f"the {self.weight_format} model ({self.numerics['inference_precision']} compute)"

    def scores(self) -> dict[str, Any] | None:
        """Task terms on the prompts that have a reference: exact match and token F1, base against candidate."""
        scored = [r for r in self.rows if r.reference is not None]
        if not scored:
            return None

        def mean(values: list[float]) -> float:
            return round(sum(values) / len(values), 4)

        return {
            "prompts": len(scored),
            "base_exact": mean([float(bool(r.base_exact)) for r in scored]),
            "model_exact": mean([float(bool(r.model_exact)) for r in scored]),
            "base_f1": mean([r.base_f1 or 0.0 for r in scored]),
            "model_f1": mean([r.model_f1 or 0.0 for r in scored]),
        }

    def judge(self) -> ValidationReport:
        """Fill in the failures: drift from the reference, adapters that change nothing or do worse than the base."""
        b, tokens = self.bounds, sum(r.tokens for r in self.rows)
        if self.agreement < b.min_agreement:
            self.failures.append(
                f"{self.what} agrees with {self.reference} on {self.agreement:.3f} of {tokens} tokens "
                f"where the reference leads by more than {b.tau} logits (at least {b.min_agreement} needed)"
            )
        if b.max_kld_mean is not None and self.kld_mean is not None and self.kld_mean > b.max_kld_mean:
            self.failures.append(
                f"{self.what} drifts from {self.reference} by a mean KL divergence of {self.kld_mean:.3g} "
                f"(at most {b.max_kld_mean})"
            )
        if b.max_kld_p99 is not None and self.kld_p99 is not None and self.kld_p99 > b.max_kld_p99:
            self.failures.append(
                f"{self.what} drifts from {self.reference} by a 99th-percentile KL divergence of "
                f"{self.kld_p99:.3g} (at most {b.max_kld_p99})"
            )
        if b.max_logprob_gap is not None and self.logprob_gap is not None and self.logprob_gap > b.max_logprob_gap:
            self.failures.append(
                f"{self.what} differs from {self.reference} by {self.logprob_gap:.3g} in the log-probability "
                f"of a chosen token (at most {b.max_logprob_gap})"
            )
        if self.adapters and self.changed < self.min_changed:
            self.failures.append(
                f"the adapters change the greedy completion of only {self.changed} of {len(self.rows)} prompts "
                f"in {Path(self.prompts).name} (at least {self.min_changed} needed): an untrained adapter, "
                "or prompts of another task (--prompts)"
            )
        scores = self.scores()
        if self.adapters and scores and scores["model_f1"] < scores["base_f1"]:
            self.failures.append(
                f"{self.what} scores below the base on its own prompts: token F1 {scores['model_f1']} "
                f"against the base's {scores['base_f1']} over {scores['prompts']} references"
            )
        return self

    def summary(self) -> dict[str, Any]:
        """What the manifest keeps: the numbers, the bounds and where they came from, and every row."""
        return {
            "passed": self.passed,
            "failures": self.failures,
            "kind": self.kind,
            "weight_format": self.weight_format,
            "numerics": self.numerics,
            "effective_numerics": self.effective,
            "prompts": self.prompts,
            "tokens": sum(r.tokens for r in self.rows),
            "agreement": round(self.agreement, 4),
            "min_agreement": self.bounds.min_agreement,
            "top1": round(self.top1, 4),
            "kld_mean": self.kld_mean,
            "kld_p99": self.kld_p99,
            "logprob_gap": self.logprob_gap,
            "bounds": self.bounds.summary(),
            "prompts_changed_by_adapters": self.changed if self.adapters else None,
            "min_changed": self.min_changed if self.adapters else None,
            "scores": self.scores(),
            "base_answers": self.base_answers,
            "rows": [asdict(r) for r in self.rows],
        }

    def table(self) -> list[dict[str, Any]]:
        """The artifact's table: prompt, base output, candidate output, agreement (as the reference demo compares)."""
        return [
            {
                "prompt": r.prompt,
                "base output": r.base_output,
                self.output_label: r.model_output,
                "agreement": f"{r.agreement:.3f}",
                "KLD mean": "-" if r.kld_mean is None else f"{r.kld_mean:.2g}",
                **({"token F1 base / candidate": f"{r.base_f1:.2f} / {r.model_f1:.2f}"} if r.reference else {}),
                **({"changed by adapters": "yes" if r.changed else "NO"} if self.adapters else {}),
            }
            for r in self.rows
        ]

    def markdown(self, name: str) -> str:
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures)
        b = self.bounds
        lines = [
            f"# Validation of {name} ({self.kind}, {self.weight_format}): {verdict}",
            "",
            f"- numerics pinned: {Numerics.from_json(self.numerics)}; "
            f"computed here: {Numerics.from_json(self.effective)}",
            f"- top-1 agreement with {self.reference}, counting disagreements where it leads by more than "
            f"{b.tau} logits: {self.agreement:.3f} (at least {b.min_agreement}); raw top-1 {self.top1:.3f}",
        ]
        if self.kld_mean is not None:
            lines.append(
                f"- KL divergence per token: mean {self.kld_mean:.3g} (at most {b.max_kld_mean}), "
                f"p99 {self.kld_p99:.3g} (at most {b.max_kld_p99})"
            )
        if self.logprob_gap is not None:
            lines.append(f"- largest log-probability gap: {self.logprob_gap:.3g} (at most {b.max_logprob_gap})")
        lines.append(f"- bounds measured from: {b.measured}")
        lines.append(f"- base outputs from {self.base_answers}")
        if self.adapters:
            lines.append(
                f"- prompts whose greedy completion the adapters change: {self.changed}/{len(self.rows)} "
                f"(at least {self.min_changed})"
            )
        if scores := self.scores():
            lines.append(
                f"- on the {scores['prompts']} prompts with a reference: exact match base {scores['base_exact']}, "
                f"candidate {scores['model_exact']}; token F1 base {scores['base_f1']}, candidate {scores['model_f1']}"
            )
        lines += ["", f"| prompt | base output | {self.output_label} | agreement |", "|---|---|---|---|"]
        for r in self.rows:
            cells = [r.prompt[-90:], r.base_output, r.model_output, f"{r.agreement:.3f}"]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", "⏎") for c in cells) + " |")
        return "\n".join(lines) + "\n"


def load_prompts(path: Path) -> list[Prompt]:
    """A JSONL prompt set: one {"prompt": str, "reference": str (optional)} object a line."""
    if not path.is_file():
        raise SourceError(f"prompt set {path}: no such file")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except ValueError as e:
            raise SourceError(f"prompt set {path} line {n}: not JSON: {e}") from None
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise SourceError(f'prompt set {path} line {n}: expected {{"prompt": str, "reference": str}}')
        ref = body.get("reference")
        if ref is not None and not isinstance(ref, str):
            raise SourceError(f"prompt set {path} line {n}: reference must be a string, got {type(ref).__name__}")
        prompts.append(Prompt(body["prompt"], ref or None))
    if not prompts:
        raise SourceError(f"prompt set {path} holds no prompts")
    return prompts


def require_computable(numerics: Numerics, device: str = "CPU") -> Numerics:
    """The numerics this CPU computes when asked for `numerics`; a build this CPU cannot validate faithfully fails."""
    got = effective(numerics, device)
    if got.inference_precision != numerics.inference_precision:
        raise PipelineError(
            f"inference precision {numerics.inference_precision} is pinned, but this {device} computes "
            f"{got.inference_precision} (OPTIMIZATION_CAPABILITIES {capabilities(device)}): the gate would validate "
            f"other numerics than a server computes; build on a CPU that has {numerics.inference_precision.upper()}, "
            "or pin --inference-precision f32"
        )
    return got


@dataclass(frozen=True)
class Scored:
    """A prompt's comparison with the reference, before the engine-specific measures are added."""

    continuation: list[int]  # the tokens scored, teacher-forced
    reference: np.ndarray  # (T, V) reference logits over the continuation
    changed: bool


def continuation(tokenizer: Any, prompt: Prompt, engine_ids: list[int]) -> list[int]:
    """The tokens to score: the prompt's expected completion and EOS, else the engine's own greedy continuation."""
    if prompt.reference is not None:
        return [*tokenizer(prompt.reference, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return list(engine_ids) or [tokenizer.eos_token_id]


def compared(cont: list[int], scores: Scores, tau: float) -> Scored:
    """What the gate reads from a prompt's reference scores.

    The adapters change the output where the base's choice differs from the reference's by more than `tau`.
    """
    base = scores.base
    changed = base is not None and bool(margin_disagreements(scores.reference, base.argmax(-1), tau).any())
    return Scored(cont, scores.reference, changed)


def make_row(
    prompt: Prompt,
    scored: Scored,
    engine_top: np.ndarray,
    base_text: str,
    model_text: str,
    tau: float,
    *,
    kld: np.ndarray | None = None,
    logprob_gap: float | None = None,
) -> Row:
    """One prompt's row: the engine's top tokens against the reference's logits, and the task scores."""
    n = len(scored.continuation)
    scores: dict[str, Any] = {}
    if prompt.reference is not None:
        scores = {
            "reference": prompt.reference,
            "base_f1": round(token_f1(base_text, prompt.reference), 4),
            "model_f1": round(token_f1(model_text, prompt.reference), 4),
            "base_exact": exact_match(base_text, prompt.reference),
            "model_exact": exact_match(model_text, prompt.reference),
        }
    return Row(
        prompt=prompt.prompt,
        base_output=base_text,
        model_output=model_text,
        tokens=n,
        agreement=1 - float(margin_disagreements(scored.reference, engine_top, tau).sum()) / n,
        top1=float((scored.reference.argmax(-1) == engine_top).mean()),
        kld_mean=None if kld is None else float(kld.mean()),
        kld_max=None if kld is None else float(kld.max()),
        logprob_gap=logprob_gap,
        changed=scored.changed,
        **scores,
    )


def ir_request(model_xml: Path, numerics: Numerics) -> Any:
    """An infer request on the IR compiled with the pinned numerics: full logits in one forward pass."""
    import openvino as ov

    return ov.Core().compile_model(str(model_xml), "CPU", engine_properties(numerics)).create_infer_request()


def ir_logits(request: Any, ids: list[int], start: int) -> np.ndarray:
    """(len(ids) - start, V) logits of a stateful optimum IR, teacher-forced in one forward pass."""
    names = {i.get_any_name() for i in request.model_inputs}
    n = len(ids)
    feed = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64)}
    if "position_ids" in names:
        feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
    if "beam_idx" in names:
        feed["beam_idx"] = np.zeros(1, dtype=np.int32)
    request.reset_state()
    request.infer(feed)
    return request.get_tensor("logits").data[0, start - 1 : n - 1].astype(np.float32)


def genai_pipeline(folder: Path, numerics: Numerics, adapters: Any = None) -> Any:
    """openvino-genai's ContinuousBatchingPipeline as the server builds it: pinned numerics, no prefix cache.

    Prefix caching stays off: its KV blocks are not keyed by adapter, so a base request after an
    adapter request on the same prompt would reuse the adapter's cached prefix.
    """
    import openvino_genai

    scheduler = openvino_genai.SchedulerConfig()
    scheduler.enable_prefix_caching = False
    properties: dict[str, Any] = dict(engine_properties(numerics))
    if adapters is not None:
        properties["adapters"] = adapters
    return openvino_genai.ContinuousBatchingPipeline(str(folder), scheduler, "CPU", properties)


def genai_generate(pipe: Any, prompts: Sequence[Sequence[int]], config: Any) -> list[Any]:
    """One `config` for every prompt (token ids, no chat template), all in one continuously batched call."""
    import openvino as ov

    inputs = [ov.Tensor(np.array([list(ids)], dtype=np.int64)) for ids in prompts]
    return list(pipe.generate(inputs, [config] * len(inputs)))


def genai_greedy(
    pipe: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, adapters: Any = None
) -> list[list[int]]:
    """The pipeline's greedy continuation of each prompt, batched."""
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.do_sample = max_new_tokens, False
    if adapters is not None:
        config.adapters = adapters
    return [list(r.m_generation_ids[0]) for r in genai_generate(pipe, prompts, config)]


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
    trust_remote_code: bool = False,
) -> ValidationReport:
    """Compare the IR with the torch reference position by position, and with the base.

    The IR's greedy continuation comes from openvino-genai with the pinned numerics (the serving
    path); the reference (tasks/reference.py, streamed layer by layer) and the IR then score the
    same tokens teacher-forced, with full logits. The base's own answers come from the engine, the
    adapters subtracted at runtime (subtracted_base_answers), checked against the reference where
    they follow the scored tokens (base_choices); where the engine cannot subtract them, or the
    check fails, from the reference itself (one streamed pass per token: slow on a large model).
    """
    log = step_logger(__name__)
    computed = require_computable(numerics)
    prompts = load_prompts(prompts_path)
    tokenizer = load_tokenizer(base_dir, tokenizer_dir, trust_remote_code=trust_remote_code)
    kind = "merged" if adapter_dirs else "base"
    tau = bounds_for(kind, weight_format, numerics.inference_precision).tau
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
        rows.append(make_row(p, compared(cont, score, tau), engine.argmax(-1), base_text, model_text, tau, kld=kld))
        klds += kld.tolist()
        log.info(
            "validated prompt %d/%d: agreement %.3f, KLD mean %.2g", i, len(prompts), rows[-1].agreement, kld.mean()
        )
    return ValidationReport.of_rows(
        kind,
        weight_format,
        numerics,
        computed,
        prompts_path,
        rows,
        klds,
        min_changed_fraction=min_changed_fraction,
        base_answers=base_answers,
    )


def min_changed(prompts: int, fraction: float) -> int:
    """How many prompts the adapters must change: `fraction` of them, and at least one."""
    return max(1, math.ceil(fraction * prompts))


def publish_report(report: ValidationReport, name: str) -> None:
    """The report as Prefect artifacts under stable keys, so the UI keeps their history."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = "validation-" + "".join(c if c.isalnum() else "-" for c in name.lower())
    create_markdown_artifact(report.markdown(name), key=key, description=f"validation of {name}")
    create_table_artifact(report.table(), key=key + "-table", description=f"validation of {name}: per prompt")


def validate_step(
    ir_dir: Path,
    base_dir: Path,
    adapter_dirs: list[Path],
    prompts_path: Path,
    weight_format: str,
    numerics: Numerics,
    model_name: str,
    tokenizer_dir: Path | None = None,
    *,
    trust_remote_code: bool = False,
) -> ValidationReport:
    """validate_ir, the report published as artifacts, and a failed validation raised."""
    report = validate_ir(
        ir_dir,
        base_dir,
        adapter_dirs,
        prompts_path,
        weight_format,
        numerics,
        tokenizer_dir,
        trust_remote_code=trust_remote_code,
    )
    publish_report(report, model_name)
    if not report.passed:
        raise ValidationFailed("validation failed: " + "; ".join(report.failures))
    return report


# What the report depends on beyond its inputs: the runtime it runs the IR on, the torch reference it
# compares with, and the gate's code (its bounds live there).
VALIDATE = Step(
    "validate",
    tools=("openvino", "openvino-genai", "openvino-tokenizers", "transformers", "tokenizers", "safetensors", "peft",
           "torch"),
    modules=("tasks.validate", "tasks.gate", "tasks.reference", "tasks.merge", "tasks.stream_merge",
             "modelrepo.numerics"),
)


def _validate_key(context: Any, parameters: dict[str, Any]) -> str | None:
    # The IR folder's name carries the hash of everything it was built from; the prompts count by content.
    ir_dir, prompts = Path(parameters["ir_dir"]), Path(parameters["prompts_path"])
    if not ir_dir.is_dir() or not prompts.is_file():
        return None
    return "validate-" + VALIDATE.key(
        str(ir_dir.resolve()),
        hashlib.sha256(prompts.read_bytes()).hexdigest(),
        parameters["weight_format"],
        parameters["numerics"].to_json(),
        parameters["model_name"],
        [str(a) for a in parameters["adapter_dirs"]],
    )


validate = task(name="validate", task_run_name="validate", cache_key_fn=_validate_key, persist_result=True)(
    validate_step
)

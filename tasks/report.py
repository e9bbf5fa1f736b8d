"""The validation report and the one comparison both validations make: prompts, a row per prompt against the
reference, the verdict, and its Prefect artifacts."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelrepo.numerics import Numerics, capabilities, effective
from tasks.errors import PipelineError, SourceError, ValidationFailed
from tasks.gate import Bounds, bounds_for, exact_match, margin_disagreements, p99, token_f1
from tasks.logs import artifact_key
from tasks.reference import Scores

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


@dataclass(frozen=True)
class Validation:
    """What one validation fixes before it runs: its kind, prompts and numerics, and the gate's tau for them."""

    kind: str  # "base", "merged" or "adapter"
    weight_format: str
    numerics: Numerics
    computed: Numerics  # what this CPU computes with `numerics` (require_computable's answer)
    prompts_path: Path
    prompts: list[Prompt]
    tau: float

    @classmethod
    def start(cls, kind: str, prompts_path: Path, weight_format: str, numerics: Numerics) -> Validation:
        """Fails early where this CPU cannot compute the pinned numerics, or the prompt set is unreadable."""
        computed = require_computable(numerics)
        tau = bounds_for(kind, weight_format, numerics.inference_precision).tau
        return cls(kind, weight_format, numerics, computed, prompts_path, load_prompts(prompts_path), tau)

    def row(
        self,
        prompt: Prompt,
        cont: list[int],
        scores: Scores,
        engine_top: np.ndarray,
        base_text: str,
        model_text: str,
        **measures: Any,
    ) -> Row:
        """One prompt's row (make_row): the engine's choices over `cont` against the reference's `scores`."""
        scored = compared(cont, scores, self.tau)
        return make_row(prompt, scored, engine_top, base_text, model_text, self.tau, **measures)

    def report(
        self,
        rows: list[Row],
        klds: list[float],
        *,
        min_changed_fraction: float,
        base_answers: str,
        publish_as: str | None,
    ) -> ValidationReport:
        """The verdict; with `publish_as` (a flow's step) published as artifacts, and raised when it failed."""
        report = ValidationReport.of_rows(
            self.kind,
            self.weight_format,
            self.numerics,
            self.computed,
            self.prompts_path,
            rows,
            klds,
            min_changed_fraction=min_changed_fraction,
            base_answers=base_answers,
        )
        return gated(report, publish_as)


def min_changed(prompts: int, fraction: float) -> int:
    """How many prompts the adapters must change: `fraction` of them, and at least one."""
    return max(1, math.ceil(fraction * prompts))


def gated(report: ValidationReport, publish_as: str | None) -> ValidationReport:
    """With a name (a flow's step), the report published under it and a failed validation raised."""
    if publish_as is None:
        return report
    publish_report(report, publish_as)
    if not report.passed:
        raise ValidationFailed("validation failed: " + "; ".join(report.failures))
    return report


def publish_report(report: ValidationReport, name: str) -> None:
    """The report as Prefect artifacts under stable keys, so the UI keeps their history."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = artifact_key("validation-" + name)
    create_markdown_artifact(report.markdown(name), key=key, description=f"validation of {name}")
    create_table_artifact(report.table(), key=key + "-table", description=f"validation of {name}: per prompt")

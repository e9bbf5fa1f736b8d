"""Validate an exported IR before it is published: against the PEFT reference in torch, and against the base."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import task

from tasks.errors import SourceError, ValidationFailed
from tasks.logs import step_logger
from tasks.merge import load_base, load_tokenizer

# The shipped default prompt set: the reference demo's SQL prompt and five more in its format.
DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "demo" / "prompts" / "sql.jsonl"
# Lowest teacher-forced top-1 agreement with the torch reference. Measured on the demo model:
# fp16 1.000, int8 0.991, int4 0.938 (STACK_NOTES); the margins absorb other prompts and models.
MIN_AGREEMENT: dict[str, float] = {"fp32": 0.99, "fp16": 0.98, "int8": 0.95, "int4": 0.85}
# Largest logit difference from the torch reference, relative to the reference's logit range at
# that position (raw logit scales differ between models). Measured on the demo model: fp16 0.0007,
# int8 0.006-0.008, int4 0.049; an IR of another merge 0.83.
MAX_RELATIVE_GAP: dict[str, float] = {"fp32": 0.005, "fp16": 0.01, "int8": 0.05, "int4": 0.25}
MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class Prompt:
    prompt: str
    reference: str | None = None  # the continuation to teacher-force; None: the torch reference's greedy one


@dataclass(frozen=True)
class Row:
    prompt: str
    base_output: str  # torch base, greedy
    reference_output: str  # torch reference (base + adapters unmerged, or the base alone), greedy
    model_output: str  # the IR through openvino-genai (the serving path, its tokenizer IRs too), greedy
    agreement: float  # teacher-forced top-1 agreement of the IR with the reference
    tokens: int  # positions compared
    logit_gap: float  # largest difference from the reference (logits, or log-probs for runtime adapters)
    gap: float  # the thresholded measure of that difference (see ValidationReport.gap_measure)
    changed: bool  # the adapters change the greedy completion (reference_output != base_output)


@dataclass(frozen=True)
class ValidationReport:
    kind: str  # "merged" (IR of base + adapters), "base" (IR of the base alone), "adapter" (runtime adapter)
    weight_format: str
    prompts: str
    rows: list[Row]
    agreement: float  # over all compared tokens
    max_logit_gap: float
    gap: float
    min_agreement: float
    max_gap: float
    gap_measure: str  # what `gap` measures, for the report
    changed: int
    min_changed: int
    failures: list[str] = field(default_factory=list)

    @classmethod
    def of_rows(
        cls,
        kind: str,
        weight_format: str,
        prompts: Path,
        rows: list[Row],
        agreement: float,
        *,
        max_gap: float,
        gap_measure: str,
        min_changed_fraction: float,
    ) -> ValidationReport:
        """The report over `rows`, judged against the thresholds of `weight_format`."""
        return cls(
            kind=kind,
            weight_format=weight_format,
            prompts=str(prompts),
            rows=rows,
            agreement=agreement,
            max_logit_gap=max(r.logit_gap for r in rows),
            gap=max(r.gap for r in rows),
            min_agreement=MIN_AGREEMENT[weight_format],
            max_gap=max_gap,
            gap_measure=gap_measure,
            changed=sum(r.changed for r in rows),
            min_changed=min_changed(len(rows), min_changed_fraction),
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

    def judge(self) -> ValidationReport:
        """Fill in the failures: too little agreement, too large a gap, adapters that change nothing."""
        tokens = sum(r.tokens for r in self.rows)
        if self.agreement < self.min_agreement:
            self.failures.append(
                f"the {self.weight_format} model agrees with {self.reference} on {self.agreement:.3f} of {tokens} "
                f"tokens (at least {self.min_agreement} needed)"
            )
        if self.gap > self.max_gap:
            self.failures.append(
                f"the {self.weight_format} model differs from {self.reference} by {self.gap:.3g} {self.gap_measure} "
                f"(at most {self.max_gap} allowed)"
            )
        if self.adapters and self.changed < self.min_changed:
            self.failures.append(
                f"the adapters change the greedy completion of only {self.changed} of {len(self.rows)} prompts "
                f"in {Path(self.prompts).name} (at least {self.min_changed} needed): an untrained adapter, "
                "or prompts of another task (--prompts)"
            )
        return self

    def summary(self) -> dict[str, Any]:
        """What the manifest keeps: the numbers, the thresholds, and every row."""
        return {
            "passed": self.passed,
            "failures": self.failures,
            "kind": self.kind,
            "weight_format": self.weight_format,
            "prompts": self.prompts,
            "agreement": round(self.agreement, 4),
            "min_agreement": self.min_agreement,
            "max_logit_gap": round(self.max_logit_gap, 4),
            "gap": round(self.gap, 4),
            "max_gap": self.max_gap,
            "gap_measure": self.gap_measure,
            "prompts_changed_by_adapters": self.changed if self.adapters else None,
            "min_changed": self.min_changed if self.adapters else None,
            "rows": [asdict(r) for r in self.rows],
        }

    def table(self) -> list[dict[str, Any]]:
        """The artifact's table: prompt, base output, merged output, agreement (as the reference demo compares)."""
        return [
            {
                "prompt": r.prompt,
                "base output": r.base_output,
                self.output_label: r.model_output,
                "agreement": f"{r.agreement:.3f}",
                "max gap": f"{r.logit_gap:.3g}",
                **({"changed by adapters": "yes" if r.changed else "NO"} if self.adapters else {}),
            }
            for r in self.rows
        ]

    def markdown(self, name: str) -> str:
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures)
        lines = [
            f"# Validation of {name} ({self.kind}, {self.weight_format}): {verdict}",
            "",
            f"- teacher-forced top-1 agreement with {self.reference}: {self.agreement:.3f} "
            f"(at least {self.min_agreement})",
            f"- largest gap: {self.gap:.3g} {self.gap_measure} (at most {self.max_gap})",
        ]
        if self.adapters:
            lines.append(
                f"- prompts whose greedy completion the adapters change: {self.changed}/{len(self.rows)} "
                f"(at least {self.min_changed})"
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


def _reference_model(base: Any, adapter_dirs: list[Path]) -> Any:
    """Base + adapters unmerged, all active at once: the sum of their deltas, as merging them in order gives."""
    from peft import PeftModel

    if not adapter_dirs:
        return base
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="a0")
    for i, adapter in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapter_dirs))])
    return model.eval()


def _greedy(model: Any, tokenizer: Any, ids: Any, max_new_tokens: int) -> list[int]:
    out = model.generate(
        input_ids=ids,
        attention_mask=ids.new_ones(ids.shape),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def validate_ir(
    ir_dir: Path,
    base_dir: Path,
    adapter_dirs: list[Path],
    prompts_path: Path,
    weight_format: str,
    tokenizer_dir: Path | None = None,
    *,
    min_changed_fraction: float = 0.5,
    max_new_tokens: int = MAX_NEW_TOKENS,
    trust_remote_code: bool = False,
) -> ValidationReport:
    """Compare the IR with the torch reference token by token, and the reference with the base greedily."""
    import openvino_genai
    import torch
    from optimum.intel import OVModelForCausalLM

    log = step_logger(__name__)
    prompts = load_prompts(prompts_path)
    tokenizer = load_tokenizer(base_dir, tokenizer_dir, trust_remote_code=trust_remote_code)
    reference = _reference_model(load_base(base_dir, tokenizer, trust_remote_code=trust_remote_code), adapter_dirs)
    ir = OVModelForCausalLM.from_pretrained(ir_dir, device="CPU", compile=True)
    pipe = openvino_genai.LLMPipeline(str(ir_dir), "CPU")
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.do_sample = False
    config.apply_chat_template = False  # the prompts are already in the chat format

    rows: list[Row] = []
    agree_total = tokens_total = 0
    for i, p in enumerate(prompts, 1):
        ids = tokenizer(p.prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref_ids = _greedy(reference, tokenizer, ids, max_new_tokens)
            if adapter_dirs:
                with reference.disable_adapter():
                    base_ids = _greedy(reference, tokenizer, ids, max_new_tokens)
            else:
                base_ids = ref_ids
            if p.reference is not None:
                cont = [*tokenizer(p.reference, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
            else:
                cont = ref_ids
            full = torch.cat([ids, torch.tensor([cont])], dim=1)
            start, end = ids.shape[1] - 1, full.shape[1] - 1  # logits at t predict token t + 1
            ref_logits = reference(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, start:end].float()
            ir_logits = ir(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, start:end].float()
        agree = int((ref_logits.argmax(-1) == ir_logits.argmax(-1)).sum())
        diff = (ref_logits - ir_logits).abs()
        span = (ref_logits.max(-1).values - ref_logits.min(-1).values).clamp_min(1e-6)
        gap = float(diff.max())
        rel = float((diff.max(-1).values / span).max())
        base_text = tokenizer.decode(base_ids, skip_special_tokens=True)
        ref_text = tokenizer.decode(ref_ids, skip_special_tokens=True)
        model_text = str(pipe.generate(p.prompt, config))
        changed = bool(adapter_dirs) and ref_ids != base_ids
        rows.append(Row(p.prompt, base_text, ref_text, model_text, agree / len(cont), len(cont), gap, rel, changed))
        agree_total += agree
        tokens_total += len(cont)
        log.info("validated prompt %d/%d: agreement %.3f, logit gap %.3g", i, len(prompts), agree / len(cont), gap)

    return ValidationReport.of_rows(
        "merged" if adapter_dirs else "base",
        weight_format,
        prompts_path,
        rows,
        agree_total / tokens_total,
        max_gap=MAX_RELATIVE_GAP[weight_format],
        gap_measure="of the reference's logit range",
        min_changed_fraction=min_changed_fraction,
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
    model_name: str,
    tokenizer_dir: Path | None = None,
    *,
    trust_remote_code: bool = False,
) -> ValidationReport:
    """validate_ir, the report published as artifacts, and a failed validation raised."""
    report = validate_ir(
        ir_dir, base_dir, adapter_dirs, prompts_path, weight_format, tokenizer_dir, trust_remote_code=trust_remote_code
    )
    publish_report(report, model_name)
    if not report.passed:
        raise ValidationFailed("validation failed: " + "; ".join(report.failures))
    return report


def _validate_key(context: Any, parameters: dict[str, Any]) -> str | None:
    # The IR folder's name carries the hash of everything it was built from; the prompts count by content.
    from tasks.workdir import input_key

    ir_dir, prompts = Path(parameters["ir_dir"]), Path(parameters["prompts_path"])
    if not ir_dir.is_dir() or not prompts.is_file():
        return None
    return "validate-" + input_key(
        str(ir_dir.resolve()),
        hashlib.sha256(prompts.read_bytes()).hexdigest(),
        parameters["weight_format"],
        parameters["model_name"],
        [str(a) for a in parameters["adapter_dirs"]],
        MIN_AGREEMENT,
        MAX_RELATIVE_GAP,
    )


validate = task(name="validate", task_run_name="validate", cache_key_fn=_validate_key, persist_result=True)(
    validate_step
)

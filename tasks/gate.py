"""The validation gate's measures and bounds: how far an engine's next-token distributions may drift from the reference.

Each compared position is one next-token prediction, teacher-forced on the same sequence in the
reference (PEFT in torch, f32) and in the engine. Three measures, as llama.cpp's KL-divergence report:
- margin-aware top-1 agreement: a disagreement counts only where the reference's own top token
  leads the engine's token by more than `tau` logits in the reference's logits. Raw top-1 counts
  every near-tie, and a trained model has many: a faithful fp16 export computed in bf16 agreed on
  0.976 of a small model's tokens, a random-weight model's 0.972 (the numerics calibration, 2026-11).
- KL divergence KL(reference || engine) per position, its mean and 99th percentile: a
  distribution measure that sees a drift long before it flips a token.
- for runtime adapters (the engine returns no full logits there): the largest gap in the
  log-probability of the engine's chosen token.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from modelrepo.numerics import INFERENCE_PRECISIONS as _PRECISIONS


@dataclass(frozen=True)
class Bounds:
    tau: float  # logits: a top-1 disagreement counts only where the reference leads the engine's token by more
    min_agreement: float  # margin-aware top-1 agreement over all compared tokens
    max_kld_mean: float | None  # None where full logits are not available (runtime adapters)
    max_kld_p99: float | None
    max_logprob_gap: float | None  # runtime adapters: |log p_ref(token) - log p_engine(token)|, largest
    measured: str  # the measurement the bounds came from

    def summary(self) -> dict[str, Any]:
        return asdict(self)


# Merged and base builds: full logits from an infer request on the IR. Measured by the numerics
# calibration (2026-11, a tool kept outside this repository, on a bf16 CPU) on four models (the
# demo's sql and spell adapters, a small trained Llama with a rank-4 alpha-32 adapter, the
# benchmark's SmolLM2-135M-shaped random model), faithful exports against exports wrong on purpose
# (adapter at half scale, the adapter of layer 0 dropped, no adapter, weights + 10% noise).
_FLOAT_F32 = Bounds(
    0.1, 0.99, 1e-3, 1e-2, None,
    "fp32/fp16 IR, f32 compute: faithful worst mean KLD 5e-5, p99 1e-3, agreement 1.000; "
    "wrong exports at best mean KLD 4e-3, agreement 0.958",
)
_FLOAT_LOW = Bounds(
    0.1, 0.98, 2e-3, 2e-2, None,
    "fp32/fp16 IR, bf16 compute (bf16 CPU): faithful worst mean KLD 9e-4, p99 1e-2, agreement 0.997; "
    "wrong exports at best mean KLD 4e-3, agreement 0.958 (f16 compute: not measured, bf16's bounds)",
)
_INT8 = Bounds(
    0.1, 0.97, 5e-2, 1.5, None,
    "int8 IR, f32 or bf16 compute: faithful worst mean KLD 4e-2, p99 1.0 (a fragile adapter), agreement 0.983; "
    "wrong exports agree at most 0.958 (KLD overlaps on flat random models, so agreement decides)",
)
_INT4 = Bounds(
    0.1, 0.85, 0.2, 3.0, None,
    "int4 IR: the demo model's raw top-1 agreement 0.938; not calibrated against wrong exports",
)
MERGED_BOUNDS: dict[tuple[str, str], Bounds] = {
    **{(fmt, "f32"): _FLOAT_F32 for fmt in ("fp32", "fp16")},
    **{(fmt, p): _FLOAT_LOW for fmt in ("fp32", "fp16") for p in ("bf16", "f16")},
    **{("int8", p): _INT8 for p in _PRECISIONS},
    **{("int4", p): _INT4 for p in _PRECISIONS},
}

# Runtime adapters: the chosen token's log-probability, one engine step a position. Measured on the
# demo (sql / spell adapter, f32 compute): fp16 base gap 0.001 / 0.008, int8 0.009 / 0.13, int4
# 0.094 / 0.25; on a bf16 CPU, fp16 base with bf16 compute: gap 0.02-0.03, raw top-1 0.917 (sql).
ADAPTER_BOUNDS: dict[tuple[str, str], Bounds] = {
    **{
        (fmt, "f32"): Bounds(0.1, 0.99, None, None, 0.05, "fp16 base, f32 compute: log-prob gap 0.001-0.008")
        for fmt in ("fp32", "fp16")
    },
    **{
        (fmt, p): Bounds(0.1, 0.98, None, None, 0.25, "fp16 base, bf16 compute (bf16 CPU): log-prob gap 0.02-0.03")
        for fmt in ("fp32", "fp16")
        for p in ("bf16", "f16")
    },
    **{("int8", p): Bounds(0.1, 0.97, None, None, 0.5, "int8 base: log-prob gap 0.009-0.13") for p in _PRECISIONS},
    **{("int4", p): Bounds(0.1, 0.85, None, None, 1.0, "int4 base: log-prob gap 0.094-0.25") for p in _PRECISIONS},
}


def bounds_for(kind: str, weight_format: str, inference_precision: str) -> Bounds:
    table = ADAPTER_BOUNDS if kind == "adapter" else MERGED_BOUNDS
    return table[(weight_format, inference_precision)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(T, V) logits -> (T, V) log-probabilities, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def margin_disagreements(reference: np.ndarray, tokens: np.ndarray, tau: float) -> np.ndarray:
    """Per position: the engine's token is not the reference's top-1, which leads it by more than `tau` logits.

    reference: (T, V) reference logits; tokens: (T,) the engine's top-1 token at each position.
    """
    rows = np.arange(len(tokens))
    top = reference.argmax(-1)
    margin = reference[rows, top] - reference[rows, tokens]
    return (top != tokens) & (margin > tau)


def kl_divergence(reference: np.ndarray, engine: np.ndarray) -> np.ndarray:
    """Per position KL(reference || engine) in nats, from (T, V) logits."""
    ref_lp, eng_lp = log_softmax(reference), log_softmax(engine)
    return np.maximum((np.exp(ref_lp) * (ref_lp - eng_lp)).sum(-1), 0.0)


def p99(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 99)) if values else 0.0


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def token_f1(candidate: str, reference: str) -> float:
    """SQuAD's token F1 over words and punctuation: 1.0 for the same bag of words."""
    got, want = _words(candidate), _words(reference)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def exact_match(candidate: str, reference: str) -> bool:
    return " ".join(candidate.split()) == " ".join(reference.split())

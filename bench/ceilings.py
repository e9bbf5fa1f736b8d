"""This machine's ceilings, and what share of them each side of a figure reaches: where a missed target stands.

    python -m bench.ceilings [--threads N]    # the machine's ceilings as JSON (torch, N threads: OpenVINO's)

Two ceilings, measured with the threads the engines use, in a process of their own (torch's OpenMP
threads must not spin beside OpenVINO's):
- reading memory: a sum over 1 GiB of f16, far past the caches. One stream generates a token per
  step and each step reads every weight once, so tokens/s times the weights' bytes is the rate a
  side reads them: a server that reads them at this machine's rate cannot go faster for one stream.
- arithmetic: torch's f32 (and bf16) matrix product of 2048 x 2048. Under load the work is the
  products: each prompt token costs 2 flops per weight of the layers, each generated token 2 per
  weight of the layers and the LM head (attention over ~130 positions adds about 3%, not counted).
  Tokens/s times flops per token is a side's rate, and a target's needed rate is read the same way.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.plan import Figure

# Bytes per weight of each format a figure serves (the per-channel scales of int8 are under 1%).
BYTES_PER_WEIGHT = {"fp16": 2.0, "int8": 1.0, "GGUF F16": 2.0, "GGUF Q8_0": 34 / 32}  # Q8_0: 32 int8 + an f16 scale


@functools.cache
def openvino_threads() -> int:
    """The threads OpenVINO's CPU plugin runs inference on here (it uses the physical cores by default)."""
    import openvino as ov

    threads = int(ov.Core().get_property("CPU", "INFERENCE_NUM_THREADS"))
    return threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _fastest(fn: Any, repeats: int) -> float:
    """The shortest of `repeats` timed calls after a warm one: a ceiling is what the machine can do."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(512 * 2**20, dtype=torch.float16)  # 1 GiB
    read_s = _fastest(data.sum, 9)
    del data
    out: dict[str, Any] = {"threads": threads, "read_gb_s": round(2**30 / read_s / 1e9, 1)}
    n = 2048
    for dtype, key in ((torch.float32, "f32_gflop_s"), (torch.bfloat16, "bf16_gflop_s")):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out[key] = round(2 * n**3 / _fastest(lambda a=a, b=b: a @ b, 9) / 1e9)
    return out


def measure_apart(threads: int, log: Path) -> dict[str, Any]:
    """`measure` in a child process (torch never loaded beside OpenVINO)."""
    with open(log, "ab") as err:
        out = subprocess.run([sys.executable, "-m", "bench.ceilings", "--threads", str(threads)], check=True,
                             stdout=subprocess.PIPE, stderr=err, timeout=600)
    return json.loads(out.stdout)


@dataclass(frozen=True)
class ModelWork:
    """A Llama's weights by where they act: the layers' linears, and the LM head (the tied embedding)."""

    layer_weights: int
    head_weights: int

    @staticmethod
    def from_config(folder: Path) -> ModelWork:
        c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        head_dim = c.get("head_dim") or h // c["num_attention_heads"]
        kv = c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
        return ModelWork(layers * per_layer, c["vocab_size"] * h)

    @property
    def weights(self) -> int:
        return self.layer_weights + self.head_weights

    def flops_per_new_token(self, prompt_tokens: int, new_tokens: int) -> float:
        """One request's products over its generated tokens: the prompt through the layers and the head once
        (the first token), then one pass of everything per further token."""
        total = 2 * self.layer_weights * prompt_tokens + 2 * self.head_weights
        total += (new_tokens - 1) * 2 * self.weights
        return total / new_tokens


def _share(rate: float, ceiling: float) -> str:
    return f"{rate / ceiling:.0%}"


def section(body: dict[str, Any], figures: list[Figure]) -> list[str]:
    """RESULTS.md's lines on the ceilings: each measured side's rate and its share, and what the targets need."""
    ceil = body.get("ceilings")
    if not ceil:
        return []
    work = ModelWork(**ceil["model"])
    plan = body["plan"]
    by_id = {f.id: f for f in figures}
    prompt_tokens = plan["prompt_tokens"] + 1  # and BOS
    flops = work.flops_per_new_token(prompt_tokens, plan["max_tokens"])
    rows: list[tuple[str, str, float, float, str]] = []  # (what, side, rate, ceiling, unit)

    def read(side: str, tok_s: float | None, fmt: str) -> None:
        if tok_s:
            rows.append(("one stream: weights read", f"{side} ({fmt}, {tok_s:.1f} tok/s)",
                         tok_s * work.weights * BYTES_PER_WEIGHT[fmt] / 1e9, ceil["read_gb_s"], "GB/s"))

    def arith(side: str, tok_s: float | None, c: int) -> None:
        if tok_s:
            rows.append((f"{c} clients: products", f"{side} ({tok_s:.0f} tok/s)", tok_s * flops / 1e9,
                         ceil["f32_gflop_s"], "GFLOP/s"))

    one, wide = min(plan["concurrencies"]), max(plan["concurrencies"])
    if f := by_id.get(f"serving.throughput.c{one}"):
        read("ours in process", f.baseline, "fp16")
        read("ours over HTTP", f.value, "fp16")
    for key, ours, theirs in (("fp16", "fp16", "GGUF F16"), ("int8", "int8", "GGUF Q8_0")):
        if f := by_id.get(f"peers.{key}.throughput.c{one}"):
            read("ours over HTTP (peers run)", f.value, ours)
            read("llama.cpp", f.baseline, theirs)
    if f := by_id.get(f"serving.throughput.c{wide}"):
        arith("ours in process", f.baseline, wide)
        arith("ours over HTTP", f.value, wide)
    if f := by_id.get(f"vs_torch.throughput.c{wide}"):
        arith("transformers fp32", f.baseline, wide)
        if f.baseline:
            arith("the target: 3x transformers", 3 * f.baseline, wide)
    if f := by_id.get(f"peers.fp16.throughput.c{wide}"):
        arith("llama.cpp F16", f.baseline, wide)
    if not rows:
        return []
    lines = [
        "",
        "## Against this machine's ceilings",
        "",
        f"Measured in this run with {ceil['threads']} threads (`python -m bench.ceilings`): memory read "
        f"{ceil['read_gb_s']} GB/s, f32 matrix product {ceil['f32_gflop_s']} GFLOP/s (bf16: "
        f"{ceil['bf16_gflop_s']}). The model: {work.layer_weights / 1e6:.1f} M weights in the layers' linears, "
        f"{work.head_weights / 1e6:.1f} M in the LM head; {flops / 1e9:.3f} GFLOP per generated token at this "
        f"run's {prompt_tokens} prompt and {plan['max_tokens']} new tokens. One stream reads every weight once "
        "per token; f32 compute on every OpenVINO side (the version's pinned numerics).",
        "",
        "| what | side | rate | ceiling | share |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {what} | {side} | {rate:.1f} {unit} | {c:g} {unit} | {_share(rate, c)} |"
              for what, side, rate, c, unit in rows]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceilings", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="default: the threads OpenVINO's CPU plugin uses")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.threads or openvino_threads())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runtime LoRA adapters against merged models, both served over HTTP by the same server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bench.artifacts import Artifacts
from bench.load import http_load
from bench.plan import Figure, Plan, median
from bench.prompts import PromptFactory
from bench.server import Server, publish

MIN_RATIO = 0.7  # issue 12's target: runtime adapters at 0.7 of merged models or better


def build_repository(art: Artifacts, repository: Path) -> tuple[list[str], list[str]]:
    """base_model with every adapter published on it, and merged_i = base + adapter i, fp16."""
    publish(repository, "base_model", art.ir("base_fp16"), kind="base")
    adapters, merged = [], []
    for i, adapter in enumerate(art.sources.adapters):
        publish(repository, f"adapter{i}", adapter, kind="adapter", base="base_model", alpha=art.sources.alpha(i))
        publish(repository, f"merged{i}", art.merged_ir(i))
        adapters.append(f"adapter{i}")
        merged.append(f"merged{i}")
    return adapters, merged


def measure_adapters(
    plan: Plan, art: Artifacts, repository: Path, prompts: PromptFactory, log: Path
) -> tuple[list[Figure], dict[str, Any]]:
    """The widest load spread round-robin over every adapter vs over the merged models; then one adapter alone."""
    adapters, merged = build_repository(art, repository)
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    wide = max(plan.concurrencies)
    single = sorted(plan.concurrencies)[len(plan.concurrencies) // 2]  # 4 in both plans
    cases = [
        ("spread", f"{len(adapters)} adapters on one base, {wide} clients", adapters, merged, wide),
        ("single", f"1 adapter, {single} clients", adapters[:1], merged[:1], single),
    ]
    with Server(repository, log) as server:
        details["server_startup_s"] = round(server.startup_s, 2)
        asyncio.run(http_load(server.url, adapters + merged, prompts.batch(len(adapters + merged)), 2, 4))  # warm
        for key, title, ours, theirs, c in cases:
            runs: dict[str, list[Any]] = {"adapters": [], "merged": []}
            # Fewer repeats than the serving figures: the adapters' cost is far above the noise.
            for r in range(max(1, plan.repeats - 1)):
                order = [("adapters", ours), ("merged", theirs)]
                for kind, models in order if r % 2 == 0 else order[::-1]:
                    batch = prompts.batch(plan.requests[c])
                    runs[kind].append(asyncio.run(http_load(server.url, models, batch, c, plan.max_tokens)))
            a_tok, m_tok = median([x.tok_s for x in runs["adapters"]]), median([x.tok_s for x in runs["merged"]])
            a_ttft, m_ttft = (median([x.ttft_p50 for x in runs[k]]) * 1000 for k in ("adapters", "merged"))
            failed = sum(x.failed for v in runs.values() for x in v)
            details[key] = {k: [x.summary() for x in v] for k, v in runs.items()}
            figures.append(Figure(
                f"adapters.{key}.throughput", f"runtime LoRA throughput: {title}", a_tok, m_tok, "tok/s",
                f"the same load on {len(theirs)} merged model(s)", f">= {MIN_RATIO:g} (ratio)",
                met=failed == 0 and a_tok >= MIN_RATIO * m_tok, note=f"{failed} failed requests" if failed else "",
                extra={"ttft_p50_ms": round(a_ttft, 1), "baseline_ttft_p50_ms": round(m_ttft, 1)},
            ))
    return figures, details

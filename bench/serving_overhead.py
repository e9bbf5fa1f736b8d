"""Serving overhead (HTTP streaming vs the in-process engine) and the speed-up over transformers generate."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.artifacts import Artifacts
from bench.load import InProcessEngine, LoadResult, http_load
from bench.plan import Figure, Plan, median, median_pair
from bench.prompts import PromptFactory
from bench.server import Server

MAX_ADDED_TTFT_MS = 5.0
MIN_THROUGHPUT_RATIO = 0.95
MIN_SPEEDUP = 3.0  # over transformers generate
TORCH_PAIRS = 2  # per concurrency: torch then ours, ours then torch


def _warm(engine: InProcessEngine, server: Server, model: str, prompts: PromptFactory) -> None:
    """One short request each way first: the first inference allocates the KV cache and compiles kernels."""
    engine.run(prompts.batch(2), 2, 4)
    asyncio.run(http_load(server.url, [model], prompts.batch(2), 2, 4))


class CpuShare:
    """CPU seconds the benchmark's client, the server and its engine processes used over one run, as shares of
    the machine's capacity (wall time x cores): where the cores went while HTTP was measured."""

    def __init__(self, server_pid: int) -> None:
        import psutil

        self.client = psutil.Process()
        self.server = psutil.Process(server_pid)
        self.before = self._read()
        self.t0 = time.perf_counter()

    def _read(self) -> dict[str, float]:
        def cpu(p: Any) -> float:
            try:
                t = p.cpu_times()
                return t.user + t.system
            except Exception:  # an engine process that ended in between
                return 0.0

        engines = {f"engine {c.pid}": cpu(c) for c in self.server.children(recursive=True)}
        return {"client": cpu(self.client), "server": cpu(self.server), **engines}

    def shares(self) -> dict[str, float]:
        after, wall = self._read(), time.perf_counter() - self.t0
        capacity = wall * (os.cpu_count() or 1)
        used = {k: after[k] - self.before.get(k, 0.0) for k in after}
        engines = sum(v for k, v in used.items() if k.startswith("engine"))
        return {
            "client_cpu_share": round(used["client"] / capacity, 3),
            "server_cpu_share": round(used["server"] / capacity, 3),
            "engines_cpu_share": round(engines / capacity, 3),
        }


def _run_pairs(
    plan: Plan, engine: InProcessEngine, server: Server, model: str, prompts: PromptFactory, c: int
) -> tuple[dict[str, list[LoadResult]], list[dict[str, float]]]:
    """`overhead_repeats` pairs of runs on fresh prompts, engine and HTTP alternating which goes first."""
    runs: dict[str, list[LoadResult]] = {"engine": [], "http": []}
    cpu: list[dict[str, float]] = []
    for r in range(plan.overhead_repeats):
        for kind in ["engine", "http"] if r % 2 == 0 else ["http", "engine"]:
            batch = prompts.batch(plan.requests[c])
            if kind == "engine":
                runs["engine"].append(engine.run(batch, c, plan.max_tokens))
            else:
                assert server.proc is not None
                share = CpuShare(server.proc.pid)
                runs["http"].append(asyncio.run(http_load(server.url, [model], batch, c, plan.max_tokens)))
                cpu.append(share.shares())
    return runs, cpu


def _overhead_figures(c: int, runs: dict[str, list[LoadResult]]) -> tuple[Figure, Figure]:
    """Throughput and TTFT of one concurrency, each from the pair of runs with the median ratio."""
    pairs = list(zip(runs["http"], runs["engine"], strict=True))
    h_tok, e_tok = median_pair([(h.tok_s, e.tok_s) for h, e in pairs])
    h_ttft, e_ttft = (x * 1000 for x in median_pair([(h.ttft_p50, e.ttft_p50) for h, e in pairs]))
    failed = sum(x.failed for x in runs["http"])
    throughput = Figure(
        f"serving.throughput.c{c}", f"HTTP streaming throughput, {c} client(s)", h_tok, e_tok, "tok/s",
        "in-process ContinuousBatchingPipeline", f">= {MIN_THROUGHPUT_RATIO} (ratio)",
        met=failed == 0 and h_tok / e_tok >= MIN_THROUGHPUT_RATIO,
        note=f"{failed} failed requests" if failed else "",
        extra={"pair_ratios": sorted(round(h.tok_s / e.tok_s, 3) for h, e in pairs if e.tok_s)},
    )
    ttft = Figure(
        f"serving.ttft.c{c}", f"HTTP time to first token (p50), {c} client(s)", h_ttft, e_ttft, "ms",
        "in-process ContinuousBatchingPipeline", f"<= {MAX_ADDED_TTFT_MS:g} ms added",
        # A negative overhead means the two sides did different work (or noise larger than the figure): not a "met".
        met=None if h_ttft < e_ttft else failed == 0 and h_ttft - e_ttft <= MAX_ADDED_TTFT_MS,
        note="; ".join(
            ([f"{failed} failed requests"] if failed else [])
            + (["HTTP faster than in-process: not judged"] if h_ttft < e_ttft else [])
        ),
        extra={
            "added_ms": round(h_ttft - e_ttft, 1),
            "pair_added_ms": sorted(round((h.ttft_p50 - e.ttft_p50) * 1000, 1) for h, e in pairs),
        },
    )
    return throughput, ttft


def measure_overhead(
    plan: Plan, art: Artifacts, server: Server, model: str, prompts: PromptFactory
) -> tuple[list[Figure], dict[str, Any]]:
    """Per concurrency, `overhead_repeats` pairs of runs, engine and HTTP alternating which goes first."""
    engine = InProcessEngine(art.merged_ir(0))
    _warm(engine, server, model, prompts)
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    for c in plan.concurrencies:
        runs, cpu = _run_pairs(plan, engine, server, model, prompts, c)
        details[f"c{c}"] = {k: [x.summary() for x in v] for k, v in runs.items()}
        throughput, ttft = _overhead_figures(c, runs)
        ttft.extra.update({
            # Where added time goes: the server's event loop answering /v2/health/live during the load,
            # and how long a Python thread waits for the GIL while the engine steps, in-process.
            "live_p50_ms": round(median([x.stalls()["stall_p50_ms"] for x in runs["http"]]), 1),
            "live_max_ms": round(median([x.stalls()["stall_max_ms"] for x in runs["http"]]), 1),
            "engine_gil_wait_max_ms": round(median([x.stalls()["stall_max_ms"] for x in runs["engine"]]), 1),
            # Shares of the cores over the HTTP runs: the benchmark's own client is on the same machine.
            **{k: round(median([x[k] for x in cpu]), 3) for k in cpu[0]},
        })
        figures += [throughput, ttft]
    del engine
    return figures, details


def measure_torch(
    plan: Plan, art: Artifacts, server: Server, model: str, prompts: PromptFactory, log: Path
) -> tuple[list[Figure], dict[str, Any]]:
    """transformers generate (fp32, the merged HF folder, static batches) against the server on the same prompts.

    Per concurrency, two pairs of runs alternating which side goes first, so both sides' figures come from the
    same minutes (a machine whose speed drifts would otherwise favour one side); speed-up: ours / theirs.
    """
    cmd = [sys.executable, "-m", "bench.torch_load", "--model", str(art.merged0_hf), "--max-tokens",
           str(plan.max_tokens)]
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    with open(log, "ab") as err, subprocess.Popen(
        cmd, env=dict(os.environ), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
    ) as torch_side:
        assert torch_side.stdin is not None and torch_side.stdout is not None
        ready = json.loads(torch_side.stdout.readline() or "{}")
        if not ready.get("ready"):
            raise RuntimeError(f"bench.torch_load did not start (its log: {log})")

        def torch_run(batch: list[str], c: int) -> dict[str, Any]:
            torch_side.stdin.write(json.dumps({"concurrency": c, "prompts": batch}) + "\n")
            torch_side.stdin.flush()
            line = torch_side.stdout.readline()
            if not line:
                raise RuntimeError(f"bench.torch_load exited (its log: {log})")
            return json.loads(line)

        for c in plan.concurrencies:
            theirs: list[dict[str, Any]] = []
            ours: list[LoadResult] = []
            for r in range(TORCH_PAIRS):
                batch = prompts.batch(plan.requests[c])
                for side in ("torch", "http") if r % 2 == 0 else ("http", "torch"):
                    if side == "torch":
                        theirs.append(torch_run(batch, c))
                    else:
                        ours.append(asyncio.run(http_load(server.url, [model], batch, c, plan.max_tokens)))
            failed = sum(x.failed for x in ours)
            mine, other = median_pair([(x.tok_s, t["tok_s"]) for x, t in zip(ours, theirs, strict=True)])
            details[f"c{c}"] = {"http": [x.summary() for x in ours], "torch": theirs}
            figures.append(Figure(
                f"vs_torch.throughput.c{c}", f"speed-up over transformers generate, {c} client(s) (ours: HTTP, "
                "the version's pinned numerics, continuous batching)", mine, other, "tok/s",
                f"transformers {ready['dtype']} generate, static batches of {c}, alternating with ours",
                f">= {MIN_SPEEDUP:g} (ratio)", met=failed == 0 and mine >= MIN_SPEEDUP * other,
                note=f"{failed} failed requests" if failed else "",
                extra={
                    "torch_ttft_p50_ms": median([t["ttft_p50_ms"] for t in theirs]),
                    "torch_threads": [t["threads"]["used"] for t in theirs],
                },
            ))
        torch_side.stdin.close()
    return figures, details

"""Runtime LoRA adapters against merged models, both served over HTTP by the same server; publishing one under load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

import modelrepo
from bench.artifacts import Artifacts
from bench.load import LoadResult, Outcome, completion_body, http_load, stream_one
from bench.plan import Figure, Plan, median, median_pair
from bench.prompts import PromptFactory
from bench.server import Server, publish

MIN_RATIO = 0.7  # issue 12's target: runtime adapters at 0.7 of merged models or better
STEADY_S = 2.0  # load before a publish
AFTER_S = 1.0  # load kept on after the first answer of what was published
PROBE_EVERY_S = 0.05
MAX_PROBES_IN_FLIGHT = 4


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
            for r in range(plan.repeats):
                order = [("adapters", ours), ("merged", theirs)]
                for kind, models in order if r % 2 == 0 else order[::-1]:
                    batch = prompts.batch(plan.requests[c])
                    runs[kind].append(asyncio.run(http_load(server.url, models, batch, c, plan.max_tokens)))
            pairs = list(zip(runs["adapters"], runs["merged"], strict=True))  # each pair ran back to back
            a_tok, m_tok = median_pair([(a.tok_s, m.tok_s) for a, m in pairs])
            a_ttft, m_ttft = (median([x.ttft_p50 for x in runs[k]]) * 1000 for k in ("adapters", "merged"))
            failed = sum(x.failed for v in runs.values() for x in v)
            details[key] = {k: [x.summary() for x in v] for k, v in runs.items()}
            figures.append(Figure(
                f"adapters.{key}.throughput", f"runtime LoRA throughput: {title}", a_tok, m_tok, "tok/s",
                f"the same load on {len(theirs)} merged model(s)", f">= {MIN_RATIO:g} (ratio)",
                met=failed == 0 and a_tok >= MIN_RATIO * m_tok, note=f"{failed} failed requests" if failed else "",
                extra={"ttft_p50_ms": round(a_ttft, 1), "baseline_ttft_p50_ms": round(m_ttft, 1)},
            ))
        figures.append(_publish_figure(plan, server, art, adapters, prompts, single, details))
    return figures, details


def _publish_figure(
    plan: Plan, server: Server, art: Artifacts, adapters: list[str], prompts: PromptFactory, clients: int,
    details: dict[str, Any],
) -> Figure:
    """A new adapter published on the served base while clients stream from one of its adapters, against a new
    version of the base itself (which compiles the base's engine and adapters again): from the index commit to
    the first answer of each. Probes go out every PROBE_EVERY_S, a few at once, as in the reload benchmark."""
    repo = server.repository
    adapter = asyncio.run(_publish_under_load(
        plan, server, adapters[:1], prompts, clients, "adapter_new",
        lambda: publish(repo, "adapter_new", art.sources.adapters[1], kind="adapter", base="base_model",
                        alpha=art.sources.alpha(1)),
    ))
    base = asyncio.run(_publish_under_load(
        plan, server, adapters[:1], prompts, clients, "base_model",
        lambda: publish(repo, "base_model", art.ir("base_fp16"), kind="base"),
    ))
    details["publish"] = {"adapter": adapter, "base_version": base}
    failed = adapter["failed_during"] + base["failed_during"]
    value, baseline = adapter["commit_to_first_answer_s"], base["commit_to_first_answer_s"]
    return Figure(
        "adapters.publish.latency",
        f"an adapter published on the served base under {clients} clients: index commit to its first answer",
        value, baseline, "s",
        "a new version of the base under the same load (its engine and adapters compiled again)",
        "0 failed", met=failed == 0 and value is not None, note=f"{failed} failed requests" if failed else "",
        extra={"engine_builds_during_adapter_publish": adapter["engine_builds"]},
    )


async def _publish_under_load(
    plan: Plan, server: Server, models: list[str], prompts: PromptFactory, clients: int, probed: str,
    publish_it: Callable[[], modelrepo.Entry],
) -> dict[str, Any]:
    """Closed-loop streams over `models`; `publish_it()` after STEADY_S; probes of `probed` until its new version
    answers (read from the answer's system_fingerprint)."""
    during = LoadResult(clients, 0.0)
    probes: list[Outcome] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(120.0), limits=limits) as client:
        builds_before = _engine_builds((await client.get("/metrics")).text)

        async def worker(i: int) -> None:
            while not stop.is_set():
                body = completion_body(models[i % len(models)], prompts.make(), plan.reload_max_tokens)
                during.outcomes.append(await stream_one(client, "/v3/completions", body))

        workers = [asyncio.create_task(worker(i)) for i in range(clients)]
        await asyncio.sleep(STEADY_S / 4 if plan.smoke else STEADY_S)
        t0 = time.time()
        entry = await asyncio.to_thread(publish_it)
        t_commit = (server.repository / "index.json").stat().st_mtime
        wanted = f"{probed}/{entry.version}"

        async def probe() -> None:
            probes.append(await stream_one(client, "/v3/completions", completion_body(probed, "def probe(", 1)))

        def first_answer() -> float | None:
            new = [p.sent + p.latency for p in probes if p.error is None and p.fingerprint == wanted]
            return min(new, default=None)

        probing: list[asyncio.Task[None]] = []
        while first_answer() is None and time.time() < t0 + 120:
            if sum(not t.done() for t in probing) < MAX_PROBES_IN_FLIGHT:
                probing.append(asyncio.create_task(probe()))
            await asyncio.sleep(PROBE_EVERY_S)
        await asyncio.sleep(AFTER_S / 4 if plan.smoke else AFTER_S)
        stop.set()
        await asyncio.gather(*workers, *probing)
        first = first_answer()
        builds = _engine_builds((await client.get("/metrics")).text) - builds_before
    during.wall = time.time() - t0
    return {
        "version": entry.version,
        "publish_s": round(t_commit - t0, 3),
        "commit_to_first_answer_s": None if first is None else round(first - t_commit, 3),
        "engine_builds": builds,
        "probes": len(probes),
        "during": during.summary(),
        "failed_during": during.failed,  # probes sent before the name exists are 404s by design: not counted
    }


def _engine_builds(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("lora_serve_engine_builds_total{"))

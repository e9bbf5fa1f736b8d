"""Hot reload under load: time from the index commit to the first answer from the new version, failed requests;
then the same for a staged version, from its promotion (the engine was built before that commit).

Which version answered is read from the answer itself: the versions' generation_config.json set
different default max_new_tokens (V1_TOKENS, V2_TOKENS, V3_TOKENS), and the probe requests set no
max_tokens, so their usage.completion_tokens names the version. Greedy text would not do: with
random weights, batching can flip near-tied tokens.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

import modelrepo
from bench.artifacts import Artifacts
from bench.load import InProcessEngine, LoadResult, completion_body, stream_one
from bench.plan import Figure, Plan
from bench.prompts import PromptFactory
from bench.server import READY, Server, publish

V1_TOKENS = 5
V2_TOKENS = 7
V3_TOKENS = 9  # the staged reload's version
STAGE_READY_S = 300  # at most, for a staged version's engine to be built
PROBE_EVERY_S = 0.1
PROBE_PROMPT = "def reload_probe("
MAX_PROBES_IN_FLIGHT = 3
STEADY_S = 3.0  # load before the publish: its failures are the baseline
MAX_RELOAD_S = 1.5  # issue 12's target, under 16 clients
AFTER_S = 2.0  # load kept on after the first new answer, while the old engine drains and retires


def cold_start(folder: Path, prompt: str) -> dict[str, float]:
    """The baseline: load the new version's pipeline in-process and answer one request, nothing else."""
    t0 = time.perf_counter()
    engine = InProcessEngine(folder)
    loaded = time.perf_counter()
    engine.answer(prompt, V2_TOKENS)
    done = time.perf_counter()
    del engine
    return {"load_s": loaded - t0, "first_answer_s": done - loaded, "total_s": done - t0}


async def _reload_under_load(
    plan: Plan,
    server: Server,
    model: str,
    new_ir: Path,
    prompts: PromptFactory,
    clients: int,
    new_tokens: int = V2_TOKENS,
    staged: bool = False,
) -> dict[str, Any]:
    """`staged`: publish the version staged, wait until the server has built it, then the commit is its promotion."""
    steady = LoadResult(clients, 0.0)
    during = LoadResult(clients, 0.0)
    bucket = steady
    stop = asyncio.Event()
    probes: list[tuple[float, float, int, str | None]] = []  # (sent, answered wall clock, completion tokens, error)
    limits = httpx.Limits(max_connections=clients + 64, max_keepalive_connections=clients + 64)
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(120.0), limits=limits) as client:

        async def worker() -> None:
            while not stop.is_set():
                body = completion_body(model, prompts.make(), plan.reload_max_tokens)
                target = bucket
                target.outcomes.append(await stream_one(client, "/v3/completions", body))

        async def probe(sent: float) -> None:
            try:
                body = completion_body(model, PROBE_PROMPT, None, stream=False)
                r = await client.post("/v3/completions", json=body)
                tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else -1
                probes.append((sent, time.time(), tokens, None if r.status_code == 200 else f"HTTP {r.status_code}"))
            except Exception as e:
                probes.append((sent, time.time(), -1, f"{type(e).__name__}: {e}"))

        workers = [asyncio.create_task(worker()) for _ in range(clients)]
        await asyncio.sleep(STEADY_S)
        stage_s = None
        if staged:  # built under the same load; the clock starts at the promotion
            t_stage = time.time()
            entry = await asyncio.to_thread(
                publish, server.repository, model, new_ir, generation={"max_new_tokens": new_tokens}, stage=True
            )
            while (await client.get(READY)).json().get("staged", {}).get(model, {}).get("ready") is not True:
                if time.time() - t_stage > STAGE_READY_S:
                    raise RuntimeError(f"the staged version was not built in {STAGE_READY_S} s")
                await asyncio.sleep(PROBE_EVERY_S)
            stage_s = round(time.time() - t_stage, 2)
        bucket = during
        t_publish = time.time()
        probe_tasks: list[asyncio.Task[None]] = []
        publishing = asyncio.create_task(asyncio.to_thread(
            (lambda: modelrepo.promote(server.repository, model)) if staged else
            (lambda: publish(server.repository, model, new_ir, generation={"max_new_tokens": new_tokens}))
        ))
        first_new: float | None = None
        swapped: float | None = None  # when /v2/health/ready first showed the new generation
        generation = (await client.get(READY)).json()["generation"]
        deadline = time.time() + 300
        while time.time() < deadline:
            # A few probes in flight at most: more would be load of their own on the old engine.
            if sum(not t.done() for t in probe_tasks) < MAX_PROBES_IN_FLIGHT:
                probe_tasks.append(asyncio.create_task(probe(time.time())))
            if swapped is None and (await client.get(READY)).json()["generation"] != generation:
                swapped = time.time()
                # One probe at once, whatever is in flight: those were sent to the old engine, which now drains
                # at a lower priority, and the next probe would wait for them.
                probe_tasks.append(asyncio.create_task(probe(time.time())))
            await asyncio.sleep(PROBE_EVERY_S)
            new = [p[1] for p in probes if p[2] == new_tokens]
            if new:
                first_new = min(new)
                break
        entry = await publishing
        t_commit = (server.repository / "index.json").stat().st_mtime
        await asyncio.sleep(AFTER_S)
        stop.set()
        t_stop = time.time()
        await asyncio.gather(*workers, *probe_tasks)
    steady.wall, during.wall = STEADY_S, t_stop - t_publish
    probe_failures = [p[3] for p in probes if p[3]]
    # The clients' own requests, by the version their answer names: when the new version's first token and
    # first whole answer reached any client (the probes say when a request sent at the swap is answered).
    new = [o for o in during.outcomes if o.fingerprint == f"{model}/{entry.version}" and o.ttft is not None]
    first_token = min((o.sent + o.ttft for o in new if o.ttft is not None), default=None)
    first_whole = min((o.sent + o.latency for o in new if o.error is None), default=None)
    first_output = min((t for t in (first_new, first_token) if t is not None), default=None)
    return {
        "version": entry.version,
        # The first moment anyone got output from the new version: a probe's whole answer or a client's first token.
        "commit_to_first_output_s": None if first_output is None else round(first_output - t_commit, 3),
        "staged_build_s": stage_s,  # staged: its publish to its engine ready in the server, under the same load
        "publish_s": round(t_commit - t_publish, 2),  # copying and hashing the version folder (or the promotion)
        "commit_to_first_answer_s": None if first_new is None else round(first_new - t_commit, 3),
        # Detection (watchfiles, or the poll), verifying the manifest's hashes, loading the engine, the swap:
        "commit_to_routing_swap_s": None if swapped is None else round(swapped - t_commit, 3),
        "commit_to_first_client_token_s": None if first_token is None else round(first_token - t_commit, 3),
        "commit_to_first_client_answer_s": None if first_whole is None else round(first_whole - t_commit, 3),
        # Every probe, relative to the commit: (sent, answered, completion tokens: which version)
        "probe_timeline": [(round(p[0] - t_commit, 2), round(p[1] - t_commit, 2), p[2]) for p in sorted(probes)],
        "steady": steady.summary(),
        "during": during.summary(),
        "probes": len(probes),
        "probe_failures": probe_failures[:3],
        "failed_during": during.failed + len(probe_failures),
        "requests_during": len(during.outcomes) + len(probes),
        "stale_probes_after_commit": sum(1 for p in probes if p[0] > t_commit and p[2] != new_tokens),
    }


def measure_reload(
    plan: Plan, art: Artifacts, server: Server, model: str, prompts: PromptFactory
) -> tuple[list[Figure], dict[str, Any]]:
    """Publish merged1 as the next version of `model` (served: merged0) while `max(concurrencies)` clients stream."""
    new_ir = art.merged_ir(1)
    baseline = cold_start(new_ir, PROBE_PROMPT)
    clients = max(plan.concurrencies)
    body = asyncio.run(_reload_under_load(plan, server, model, new_ir, prompts, clients))
    body["cold_start"] = {k: round(v, 3) for k, v in baseline.items()}
    body["server_ready_after"] = server.ready()
    latency = body["commit_to_first_answer_s"]
    figures = [
        Figure(
            "reload.latency", f"hot reload under {clients} clients: index commit to first answer of the new version",
            latency, baseline["total_s"], "s",
            "cold in-process load of the new version + its first answer, idle machine",
            target=f"<= {MAX_RELOAD_S:g} s, 0 failed",
            met=latency is not None and latency <= MAX_RELOAD_S and body["failed_during"] == 0,
            note=f"routing table swapped {body['commit_to_routing_swap_s']} s after the commit",
            extra={"publish_s": body["publish_s"], "commit_to_routing_swap_s": body["commit_to_routing_swap_s"]},
        ),
        Figure(
            "reload.failed_requests", f"failed requests during the reload ({body['requests_during']} requests)",
            body["failed_during"], body["steady"]["failed"], "requests",
            f"failed requests in {STEADY_S:g} s of the same load before it ({body['steady']['requests']} requests)",
            target="0", met=body["failed_during"] == 0 and body["commit_to_first_answer_s"] is not None,
        ),
    ]
    staged = asyncio.run(_reload_under_load(
        plan, server, model, art.merged_ir(0), prompts, clients, new_tokens=V3_TOKENS, staged=True
    ))
    body["staged"] = staged
    # No compile after the promotion: what is left is the load's own queue, so the baseline is the same load's
    # time to a first token with no reload at all.
    latency, queue_s = staged["commit_to_first_output_s"], staged["steady"]["ttft_p50_ms"] / 1000
    figures.append(Figure(
        "reload.staged_latency",
        f"staged version promoted under {clients} clients: promotion commit to the new version's first output",
        latency, queue_s, "s",
        f"time to first token under the same {clients} clients with no reload (median)",
        target=f"<= {MAX_RELOAD_S:g} s, 0 failed",
        met=latency is not None and latency <= MAX_RELOAD_S and staged["failed_during"] == 0,
        note=(f"swap {staged['commit_to_routing_swap_s']} s after the promotion; its engine was built "
              f"{staged['staged_build_s']} s after the staged publish, under the same load; "
              f"{staged['failed_during']} of {staged['requests_during']} requests failed; "
              f"a direct publish: {body['commit_to_first_output_s']} s"),
        extra={"staged_build_s": staged["staged_build_s"], "failed_during": staged["failed_during"],
               "commit_to_routing_swap_s": staged["commit_to_routing_swap_s"],
               "probe_answer_s": staged["commit_to_first_answer_s"],
               "first_client_token_s": staged["commit_to_first_client_token_s"]},
    ))
    return figures, body

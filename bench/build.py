"""Build cost: the build_model flow against the bare library calls; fp16 against int8 size and throughput."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.artifacts import Artifacts
from bench.load import InProcessEngine
from bench.plan import Figure, Plan, median
from bench.procs import run_measured
from bench.prompts import PromptFactory

VALIDATION_PROMPTS = 2
_LOG_LINE = re.compile(r"^(?P<time>\d\d:\d\d:\d\d\.\d+) \| \w+\s+\| (?P<msg>.*)$")
_TASK_DONE = re.compile(r"^Task run '(?P<task>[^']+)' - Finished in state")


def flow_env(folder: Path, **extra: str) -> dict[str, str]:
    """A fresh Prefect home under `folder`: the flow must not reuse cached steps from an earlier run.

    PREFECT_API_URL, when set (the test suite's server), is kept: the flow then starts no server of its own.
    """
    home = folder / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    return dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )


def _env(plan: Plan, name: str) -> dict[str, str]:
    return flow_env(plan.work / name, LORA_WORK_DIR=str(plan.work / name / "work"))


def flow_breakdown(log_text: str) -> dict[str, float]:
    """Seconds between the flow run's milestones in Prefect's log: server start, then each task's end."""
    events: list[tuple[str, float]] = []
    for line in log_text.splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        h, mi, s = (float(x) for x in m["time"].split(":"))
        t = h * 3600 + mi * 60 + s
        if "Starting temporary server" in m["msg"]:
            events.append(("start", t))
        elif m["msg"].startswith("Flow run") and "Beginning flow run" in m["msg"]:
            events.append(("prefect temporary server start", t))
        elif (task := _TASK_DONE.match(m["msg"])) is not None:
            events.append((task["task"], t))
        elif m["msg"].startswith("Flow run") and "Finished in state" in m["msg"]:
            events.append(("flow end", t))
    out: dict[str, float] = {}
    for (_, t0), (name, t1) in itertools.pairwise(events):
        out[name] = round(out.get(name, 0.0) + (t1 - t0) % 86400, 2)
    return out


def measure_build(plan: Plan, art: Artifacts, log: Path) -> tuple[list[Figure], dict[str, Any]]:
    base, adapter = art.sources.base, art.sources.adapters[0]
    bare_cmd = [sys.executable, "-m", "bench.bare_build", "--base", str(base), "--adapter", str(adapter),
                "--out", str(plan.work / "bare" / "out")]
    flow_cmd = [sys.executable, "-m", "flows.build_model", "--source-model", str(base), "--adapter", str(adapter),
                "--model-name", "bench", "--repository", str(plan.work / "flow" / "repository"),
                "--weight-format", "fp16", "--work-dir", str(plan.work / "flow" / "work")]
    flow_log = log.with_name("build-flow.log")
    # Fewer validation prompts than the flow's default set: validating costs tens of seconds a prompt on this
    # model, and the run must fit in 20 minutes. The per-prompt cost is in the details.
    from tasks.report import DEFAULT_PROMPTS

    prompts = plan.work / "validation-prompts.jsonl"
    lines = DEFAULT_PROMPTS.read_text(encoding="utf-8").splitlines()[:VALIDATION_PROMPTS]
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    flow_cmd += ["--prompts", str(prompts)]
    if importlib.util.find_spec("flows.build_model") is None:
        flow_cmd = []
    # The smoke run builds both at once to stay short: its figures only show the benchmark works.
    with ThreadPoolExecutor(2 if plan.smoke else 1) as pool:
        bare_future = pool.submit(run_measured, bare_cmd, _env(plan, "bare"), log)
        if not plan.smoke:
            bare_future.result()
        flow_future = pool.submit(run_measured, flow_cmd, _env(plan, "flow"), flow_log) if flow_cmd else None
        bare = bare_future.result()
        flow = flow_future.result() if flow_future else None
    details: dict[str, Any] = {"bare": {"returncode": bare.returncode, "wall_s": round(bare.wall_s, 2),
                                        "peak_rss_mb": round(bare.peak_rss_mb), "steps_s": _json(bare.stdout)}}
    if bare.returncode != 0:
        raise RuntimeError(f"the bare build failed ({bare.returncode}); see {log}")
    if flow is None:
        note = "flows/build_model.py does not exist yet: no flow figure"
        return [Figure("build.wall", "build_model flow wall time", None, bare.wall_s, "s", "bare library calls",
                       note=note),
                Figure("build.peak_memory", "build_model flow peak memory", None, bare.peak_rss_mb, "MB",
                       "bare library calls", note=note)], details
    details["flow"] = {"returncode": flow.returncode, "wall_s": round(flow.wall_s, 2),
                       "peak_rss_mb": round(flow.peak_rss_mb),
                       "steps_s": flow_breakdown(flow_log.read_text(encoding="utf-8", errors="replace"))}
    steps = details["flow"]["steps_s"]
    steps["process start and imports (before the first log line)"] = round(flow.wall_s - sum(steps.values()), 2)
    details["flow"]["validation_prompts"] = VALIDATION_PROMPTS
    details["concurrent"] = plan.smoke
    ok = flow.returncode == 0
    note = "" if ok else f"the flow run failed (exit {flow.returncode}); see {flow_log}"
    return [
        Figure("build.wall", f"build_model flow wall time (merge, export, validate on {VALIDATION_PROMPTS} prompts, "
               "publish; fp16)",
               flow.wall_s if ok else None, bare.wall_s, "s", "bare library calls: merge, export, tokenizer conversion",
               note=note),
        Figure("build.peak_memory", "build_model flow peak memory (process tree RSS)",
               flow.peak_rss_mb if ok else None, bare.peak_rss_mb, "MB", "bare library calls", note=note),
    ], details


def _json(text: str) -> Any:
    try:
        return json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return text[-500:]


def measure_int8(plan: Plan, art: Artifacts, prompts: PromptFactory) -> tuple[list[Figure], dict[str, Any]]:
    """IR size and in-process throughput at the middle concurrency, int8 against fp16 weights of the base."""
    size = {f: (art.ir(f"base_{f}") / "openvino_model.bin").stat().st_size / 2**20 for f in ("fp16", "int8")}
    c = sorted(plan.concurrencies)[len(plan.concurrencies) // 2]
    tok_s: dict[str, list[float]] = {}
    for fmt in ("fp16", "int8"):
        engine = InProcessEngine(art.ir(f"base_{fmt}"))
        engine.run(prompts.batch(2), 2, 4)  # warm
        tok_s[fmt] = [engine.run(prompts.batch(plan.requests[c]), c, plan.max_tokens).tok_s
                      for _ in range(max(1, plan.repeats - 1))]
        del engine
    figures = [
        Figure("weights.int8.size", "int8 IR size (openvino_model.bin)", size["int8"], size["fp16"], "MB", "fp16 IR"),
        Figure("weights.int8.throughput", f"int8 throughput, {c} clients, in-process", median(tok_s["int8"]),
               median(tok_s["fp16"]), "tok/s", "fp16 IR"),
    ]
    return figures, {"size_mb": {k: round(v, 1) for k, v in size.items()}, "tok_s": tok_s}

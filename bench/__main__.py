"""Run every benchmark and write the figures: bench/out/results.json and bench/RESULTS.md.

    python -m bench             # the full run on a SmolLM2-135M-shaped model (under 20 min on 2 cores)
    python -m bench --smoke     # every figure once on the tiny demo model, 1-2 short requests each (~1-2 min)
    python -m bench --peers     # the full run and llama.cpp's llama-server side by side (bench/peers.py; it is
                                # built once, about 7 minutes)
    python -m bench --large     # real-size models (1.7B and 7B shapes) built, validated and served: bench/large.py
    ./dev.sh bench [--smoke]    # the same, in the project's environment

Every figure is a value and its baseline measured in the same run (see bench/plan.py's Figure).
The models are built once and cached in ~/.cache/lora-pipeline/bench-sources (LORA_BENCH_CACHE).
A smoke run writes OUT/smoke/results.json and OUT/smoke/RESULTS.md and leaves bench/RESULTS.md alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.plan import Figure, Plan

HERE = Path(__file__).resolve().parent
SUITES = ("serving", "reload", "torch", "adapters", "build", "weights")
PEERS = "peers"  # run only when asked for (--peers or --only peers): it builds llama.cpp once


def expected_figures(plan: Plan, only: set[str]) -> list[str]:
    """Every figure id a complete run of the suites in `only` records (the smoke test checks them all)."""
    from bench.peers import expected_figures as peer_figures

    cs = plan.concurrencies
    by_suite = {
        "serving": [f"serving.{what}.c{c}" for c in cs for what in ("throughput", "ttft")],
        "reload": ["reload.latency", "reload.failed_requests", "reload.staged_latency"],
        "torch": [f"vs_torch.throughput.c{c}" for c in cs],
        "adapters": ["adapters.spread.throughput", "adapters.single.throughput", "adapters.publish.latency"],
        "build": ["build.wall", "build.peak_memory"],
        "weights": ["weights.int8.size", "weights.int8.throughput"],
        PEERS: peer_figures(plan),
    }
    return [i for suite, ids in by_suite.items() if suite in only for i in ids]


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def run(plan: Plan, only: set[str]) -> tuple[dict[str, Any], list[Figure]]:
    from bench import report
    from bench.adapters import measure_adapters
    from bench.artifacts import bench_sources, demo_sources, ensure_artifacts
    from bench.build import measure_build, measure_int8
    from bench.ceilings import ModelWork, measure_apart, openvino_threads
    from bench.prompts import PromptFactory
    from bench.reload import V1_TOKENS, measure_reload
    from bench.server import Server, publish
    from bench.serving_overhead import measure_overhead, measure_torch

    started, load_start = time.time(), report.load_average()
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def attempt(name: str, fn: Callable[[], tuple[list[Figure], Any]]) -> None:
        if name not in only:
            return
        _log(f"{name} ...")
        t = time.perf_counter()
        try:
            figs, body = fn()
            figures.extend(figs)
            details[name] = body
            for f in figs:
                _log(f"  {f.id}: {f.value if f.value is None else round(f.value, 2)} {f.unit} "
                     f"vs {f.baseline if f.baseline is None else round(f.baseline, 2)} "
                     f"(ratio {None if f.ratio is None else round(f.ratio, 3)})")
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        timings[name] = round(time.perf_counter() - t, 1)
        _log(f"{name} done in {timings[name]:.0f} s")

    t = time.perf_counter()
    sources = demo_sources() if plan.smoke else bench_sources()
    art = ensure_artifacts(sources)
    timings["models"] = round(time.perf_counter() - t, 1)
    _log(f"models ready in {timings['models']:.0f} s: {art.root}")
    prompts = PromptFactory(sources.base / "tokenizer.json", plan.prompt_tokens)
    ceilings = [measure_apart(openvino_threads(), logs / "ceilings.log")]  # again at the end: the machine drifts

    repository = plan.work / "repo-serving"
    model = "bench"
    publish(repository, model, art.merged_ir(0), generation={"max_new_tokens": V1_TOKENS})
    if only & {"serving", "reload", "torch"}:
        with Server(repository, logs / "server-serving.log") as server:
            details["server_startup_s"] = round(server.startup_s, 2)
            attempt("serving", lambda: measure_overhead(plan, art, server, model, prompts))
            # Before the reload: it publishes the next version, and torch runs on the first one.
            attempt("torch", lambda: measure_torch(plan, art, server, model, prompts, logs / "torch.log"))
            attempt("reload", lambda: measure_reload(plan, art, server, model, prompts))
    attempt("adapters", lambda: measure_adapters(plan, art, plan.work / "repo-adapters", prompts,
                                                 logs / "server-adapters.log"))
    attempt("build", lambda: measure_build(plan, art, logs / "build.log"))
    attempt("weights", lambda: measure_int8(plan, art, prompts))
    if PEERS in only:
        from bench.peers import measure_peers

        attempt(PEERS, lambda: measure_peers(plan, art, prompts, logs))

    ceilings.append(measure_apart(openvino_threads(), logs / "ceilings.log"))
    finished = time.time()
    return {
        "command": "python -m bench" + (" --smoke" if plan.smoke else ""),
        "model": f"{sources.name} ({sources.base})",
        "started_at": report.datetime.fromtimestamp(started, report.UTC).isoformat(timespec="seconds"),
        "finished_at": report.now(),
        "duration_s": round(finished - started, 1),
        "load_average": {"start": load_start, "end": report.load_average()},
        "machine": report.machine(),
        "versions": report.versions(),
        "plan": plan.describe(),
        "timings_s": timings,
        "figures": [f.as_json() for f in figures],
        "expected_figures": expected_figures(plan, only),
        "errors": errors,
        "details": details,
        "ceilings": {
            **{k: max(c[k] for c in ceilings) for k in ceilings[0]},
            "measured": ceilings,
            "model": vars(ModelWork.from_config(sources.base)),
        },
    }, figures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--large" in argv:
        from bench.large import main as large

        return large([a for a in argv if a != "--large"])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny demo model, 1-2 short requests per figure")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="where results.json and logs go")
    parser.add_argument("--only", default=",".join(SUITES),
                        help=f"comma-separated subset of {','.join((*SUITES, PEERS))}")
    parser.add_argument("--peers", action="store_true", help="also llama.cpp's llama-server, side by side")
    parser.add_argument("--keep", action="store_true", help="keep the scratch repositories")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()} | ({PEERS} if args.peers else set())
    known = {*SUITES, PEERS}
    if only - known:
        parser.error(f"--only: unknown suites {sorted(only - known)}; known: {', '.join(sorted(known))}")
    from bench import report

    out = args.out / "smoke" if args.smoke else args.out
    work = Path(tempfile.mkdtemp(prefix="bench-work-"))
    plan = Plan.make(args.smoke, out, work)
    try:
        body, figures = run(plan, only)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report.write_json(out / "results.json", body)
    md = out / "RESULTS.md" if args.smoke or not set(SUITES) <= only else HERE / "RESULTS.md"
    report.write_markdown(md, body, figures)
    _log(f"wrote {out / 'results.json'} and {md} in {body['duration_s'] / 60:.1f} min")
    missing = sorted(set(body["expected_figures"]) - {f.id for f in figures})
    if body["errors"] or missing:
        _log(f"incomplete: errors {body['errors']}, missing figures {missing}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

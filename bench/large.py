"""Real-size models through the pipeline on this machine: build, validate, serve; memory and time of each stage.

    ./dev.sh bench --large            # python -m bench.large: both shapes (about an hour on 2 cores)
    ./dev.sh bench --large --shapes 1.7b

- 1.7b (SmolLM2-1.7B's shapes, bf16): the build_model flow (fp16, gate on) against `optimum-cli export
  openvino --weight-format fp16` of the same base, side by side: peak memory and wall time.
- 7b (Llama-2-7B's shapes, fp16): the flow builds fp16 (for CPU) and int8 (for GPU) with the gate on;
  the fp16 version is served (python -m serving): its load time and tokens/s at 1 and 4 clients.

Random weights, the benchmark's tokenizer, an r8 q/v adapter (bench/large_model.py), made once and
cached in LORA_BENCH_CACHE/large. Not part of CI or of `./dev.sh bench`. Checks the free disk before
each shape and removes what it no longer needs as it goes. Writes bench/out/large/results.json and
the "Real-size models" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.build import flow_env
from bench.load import http_load
from bench.procs import Measured, run_measured
from bench.report import LARGE_SECTION as SECTION
from bench.report import machine, now, versions
from tasks.resources import tree_memory

HERE = Path(__file__).resolve().parent
SERVE_TOKENS = 32


def _log(msg: str) -> None:
    print(f"[bench --large] {msg}", flush=True)


def cache_root() -> Path:
    from bench.model import default_cache

    return default_cache() / "large"


def sources(shape: str) -> tuple[Path, Path]:
    """The cached random model of `shape` and its adapter, with the benchmark's tokenizer."""
    from bench.large_model import make_large_model
    from bench.model import ensure_bench_sources

    return make_large_model(cache_root() / shape, shape, ensure_bench_sources().base)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def require_disk(where: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(where).free
    if free < needed:
        raise SystemExit(f"{what} needs about {needed / 1e9:.0f} GB of disk in {where}, {free / 1e9:.0f} GB free")
    _log(f"{what}: needs about {needed / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB free")


def _prompts(work: Path) -> Path:
    """The default prompt set without its expected answers: a random model has no task to be scored on.

    The gate then compares each prompt's own greedy continuation, as for any prompt set without references.
    """
    from tasks.report import DEFAULT_PROMPTS, load_prompts

    work.mkdir(parents=True, exist_ok=True)
    path = work / "validation-prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in load_prompts(DEFAULT_PROMPTS)))
    return path


def build(base: Path, adapter: Path, fmt: str, work: Path, repository: Path, logs: Path) -> dict[str, Any]:
    """The build_model flow as a user runs it, measured from outside; its own per-stage figures from the manifest."""
    cmd = [sys.executable, "-m", "flows.build_model", "--source-model", str(base), "--adapter", str(adapter),
           "--model-name", f"large-{fmt}", "--repository", str(repository), "--weight-format", fmt,
           "--work-dir", str(work / "work"), "--prompts", str(_prompts(work))]
    _log(f"building {base.parent.name} {fmt} ...")
    m = run_measured(cmd, flow_env(work), logs / f"build-{base.parent.name}-{fmt}.log", timeout=4 * 3600)
    body: dict[str, Any] = {"returncode": m.returncode, "wall_s": round(m.wall_s, 1), **_peaks(m)}
    if m.returncode == 0:
        from modelrepo import read_index

        entry = read_index(repository).entries[f"large-{fmt}"]
        manifest = json.loads((repository / entry.path / "manifest.json").read_text())
        body["stages"] = manifest.get("stages")
        body["validation"] = {k: manifest["validation"].get(k) for k in ("passed", "agreement", "kld_mean", "tokens")}
        body["ir_gb"] = round((repository / entry.path / "openvino_model.bin").stat().st_size / 1e9, 2)
    _log(f"  {fmt}: exit {m.returncode}, {body['wall_s']} s, peak {body['peak_rss_gb']} GB")
    return body


def optimum_cli(base: Path, fmt: str, out: Path, logs: Path) -> dict[str, Any]:
    cmd = [shutil.which("optimum-cli") or "optimum-cli", "export", "openvino", "--model", str(base), "--task",
           "text-generation-with-past", "--weight-format", fmt, str(out)]
    _log(f"optimum-cli {fmt} ...")
    m = run_measured(cmd, dict(os.environ), logs / f"optimum-cli-{base.parent.name}-{fmt}.log", timeout=3600)
    shutil.rmtree(out, ignore_errors=True)
    body = {"returncode": m.returncode, "wall_s": round(m.wall_s, 1), **_peaks(m)}
    _log(f"  optimum-cli: exit {m.returncode}, {m.wall_s:.0f} s, peak {body['peak_rss_gb']} GB")
    return body


def _peaks(m: Measured) -> dict[str, float]:
    gb = 2**20 / 1e9
    return {"peak_rss_gb": round(m.peak_rss_mb * gb, 2), "peak_anon_gb": round(m.peak_anon_mb * gb, 2)}


def serve(repository: Path, model: str, logs: Path) -> dict[str, Any]:
    """The server's time to ready on this repository, and streaming tokens/s at 1 and 4 clients."""
    from bench.server import Server

    _log(f"serving {model} ...")
    body: dict[str, Any] = {}
    with Server(repository, logs / "server-large.log") as server:
        body["load_s"] = round(server.startup_s, 1)
        prompt = "[user] Write a SQL query to answer the question based on the table schema. [/user] [assistant]"
        for clients in (1, 4):
            result = asyncio.run(http_load(server.url, [model], [prompt] * clients * 2, clients, SERVE_TOKENS))
            body[f"c{clients}"] = result.summary()
            _log(f"  {clients} client(s): {result.tok_s:.1f} tok/s, {result.failed} failed")
        body["answer"] = result.outcomes[0].text if result.outcomes else None
        assert server.proc is not None
        rss, anon = tree_memory(psutil.Process(server.proc.pid))
        body["server_rss_gb"], body["server_anon_gb"] = round(rss / 1e9, 2), round(anon / 1e9, 2)
    return body


def run_1_7b(work: Path, logs: Path) -> dict[str, Any]:
    base, adapter = sources("1.7b")
    require_disk(work, 4 * _size(base), "the 1.7b builds (merged copy, IR, optimum-cli's IR)")
    out: dict[str, Any] = {"parameters_b": _parameters(base)}
    out["optimum_cli_fp16"] = optimum_cli(base, "fp16", work / "cli-fp16", logs)
    out["flow_fp16"] = build(base, adapter, "fp16", work / "flow", work / "repo-1.7b", logs)
    shutil.rmtree(work / "flow", ignore_errors=True)
    shutil.rmtree(work / "repo-1.7b", ignore_errors=True)
    return out


def run_7b(work: Path, logs: Path) -> dict[str, Any]:
    base, adapter = sources("7b")
    # At the fullest: the merged copy (kept for both formats), the fp16 IR and its published copy.
    require_disk(work, int(3.2 * _size(base)), "the 7b builds")
    repository = work / "repo-7b"
    out: dict[str, Any] = {"parameters_b": _parameters(base)}
    out["flow_fp16"] = build(base, adapter, "fp16", work / "flow", repository, logs)
    for ir in (work / "flow" / "work").glob("ir-*"):  # published (copied): the cached IR can go
        shutil.rmtree(ir)
    out["flow_int8"] = build(base, adapter, "int8", work / "flow", repository, logs)
    shutil.rmtree(work / "flow", ignore_errors=True)
    if out["flow_fp16"]["returncode"] == 0:
        out["serve_fp16"] = serve(repository, "large-fp16", logs)
    shutil.rmtree(repository, ignore_errors=True)
    return out


def _parameters(base: Path) -> float:
    from tasks.resources import weights_size

    return round(weights_size(base).parameters / 1e9, 2)


def markdown(body: dict[str, Any]) -> str:
    m = body["machine"]
    lines = [SECTION, "", f"Measured {body['finished_at']} on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
             f"OPTIMIZATION_CAPABILITIES {m['openvino_capabilities']}; numerics {m['numerics']}. Peak memory is the "
             "summed RSS of the process tree (the flow's own Prefect server included). Each shape measured at: "
             + ", ".join(f"{shape} {runs.get('measured_at')}" for shape, runs in body["shapes"].items()) + ".", ""]
    lines += ["| model | command | peak memory (RSS) | not file-backed | wall time | stages: time / peak RSS |",
              "|---|---|---|---|---|---|"]
    for shape, runs in body["shapes"].items():
        params = runs.get("parameters_b")
        for name, run in runs.items():
            if not isinstance(run, dict) or "peak_rss_gb" not in run:
                continue
            note = "" if run["returncode"] == 0 else f"FAILED (exit {run['returncode']})"
            if stages := run.get("stages"):
                note += "; ".join(f"{s['name']} {s['seconds']:.0f} s / {s['peak_rss_gb']:.1f} GB" for s in stages)
            lines.append(f"| {shape} ({params} B) | {name} | {run['peak_rss_gb']:.1f} GB | "
                         f"{run['peak_anon_gb']:.1f} GB | {run['wall_s']:.0f} s | {note} |")
        if serve_body := runs.get("serve_fp16"):
            c1, c4 = serve_body.get("c1", {}), serve_body.get("c4", {})
            lines.append(f"| {shape} ({params} B) | serve fp16 | {serve_body.get('server_rss_gb')} GB | "
                         f"{serve_body.get('server_anon_gb')} GB | load {serve_body.get('load_s')} s | "
                         f"{c1.get('tok_s')} tok/s at 1 client, {c4.get('tok_s')} at 4; "
                         f"answer {serve_body.get('answer')!r} |")
    return "\n".join(lines) + "\n"


def write_results(body: dict[str, Any]) -> None:
    results = HERE / "RESULTS.md"
    text = results.read_text() if results.is_file() else ""
    section = markdown(body)
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip() + "\n\n" + section
    results.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.large", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1.7b,7b", help="comma-separated: 1.7b, 7b")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "large")
    args = parser.parse_args(argv)
    runners = {"1.7b": run_1_7b, "7b": run_7b}
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if unknown := [s for s in shapes if s not in runners]:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(runners)}")
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    body: dict[str, Any] = {"command": "python -m bench.large --shapes " + ",".join(shapes), "started_at": now(),
                            "machine": machine(), "versions": versions(), "shapes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-large-", dir=cache_root().parent) as tmp:
        for shape in shapes:
            t = time.perf_counter()
            body["shapes"][shape] = runners[shape](Path(tmp), logs) | {"measured_at": now()}
            _log(f"{shape} done in {time.perf_counter() - t:.0f} s")
    body["finished_at"] = now()
    # Shapes not run this time keep their last figures, with the date they were measured.
    previous = args.out / "results.json"
    if previous.is_file():
        last = json.loads(previous.read_text())
        for shape, runs in last.get("shapes", {}).items():
            if shape not in body["shapes"]:
                body["shapes"][shape] = {"measured_at": last.get("finished_at")} | runs
    (args.out / "results.json").write_text(json.dumps(body, indent=2) + "\n")
    write_results(body)
    _log(f"wrote {args.out / 'results.json'} and the section of {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

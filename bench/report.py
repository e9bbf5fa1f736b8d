"""The machine, the library versions, and the figures as JSON and as a markdown table.

    python -m bench.report [RESULTS_JSON [RESULTS_MD]]   # re-render RESULTS.md (e.g. after editing ANALYSIS.md)
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from bench.ceilings import section as ceilings_section
from bench.plan import Figure

LARGE_SECTION = "## Real-size models (`./dev.sh bench --large`)"  # written by bench/large.py, kept by the others

LIBRARIES = ("openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "nncf", "torch", "transformers",
             "peft", "prefect", "litestar", "uvicorn", "httpx")
# The hand-written analysis of the last full run (profiles of missed targets), included in RESULTS.md.
ANALYSIS = Path(__file__).with_name("ANALYSIS.md")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", "x86_64"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    from modelrepo.numerics import capabilities, default_numerics

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "openvino_capabilities": capabilities(),
        "numerics": str(default_numerics()),
        "avx512": any(f.startswith("avx512") for f in flags),
        "amx": any(f.startswith("amx") for f in flags),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_json(path: Path, body: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    text = f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return f"{text} {unit}".strip()


def _ratio(f: Figure) -> str:
    r = f.ratio
    if r is None:
        return "—"
    added = f.extra.get("added_ms")
    return f"{r:.2f} ({added:+.1f} ms)" if added is not None else f"{r:.2f}"


def markdown(body: dict[str, Any], figures: list[Figure]) -> str:
    m, v, plan = body["machine"], body["versions"], body["plan"]
    lines = [
        "# Benchmark results",
        "",
        f"`{body['command']}`, {body['finished_at']}, {body['duration_s'] / 60:.1f} min. "
        f"Model: {body['model']}. Every figure is a ratio against a baseline measured in the same run.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, AVX-512 {'yes' if m['avx512'] else 'no'}; "
        f"Python {m['python']}.",
        f"- Numerics: every OpenVINO side of a ratio computes with {m.get('numerics', '?')} (pinned by the version, "
        f"applied by server and in-process engine alike; OPTIMIZATION_CAPABILITIES "
        f"{' '.join(m.get('openvino_capabilities', []))}); the transformers baseline in fp32.",
        f"- Load average (1, 5, 15 min) at start {body['load_average']['start']}, "
        f"at end {body['load_average']['end']}: other processes on the machine skew the figures.",
        "- Libraries: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
        f"- Load: {plan['prompt_tokens']}-token fresh prompts (no prefix-cache hits), {plan['max_tokens']} new tokens, "
        f"greedy, EOS ignored; closed loop (each client sends its next request when the last ends); "
        f"{plan['repeats']} pairs of runs per figure ({plan.get('overhead_repeats', plan['repeats'])} for the "
        "serving overhead), the two sides alternating which goes first; the serving, transformers, llama.cpp and "
        "adapter ratios are each that of the pair with the median ratio.",
        "",
        "| Figure | Value | Baseline | Ratio | Target | Met |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        met = "—" if f.met is None else ("yes" if f.met else "**no**")
        title = f.title + (f" ({f.note})" if f.note else "")
        lines.append(
            f"| {title} | {_fmt(f.value, f.unit)} | {_fmt(f.baseline, f.unit)}: {f.baseline_name} | {_ratio(f)} "
            f"| {f.target or '—'} | {met} |"
        )
    peers = body.get("details", {}).get("peers")
    if peers:
        build = peers["llama_server"]
        lines += [
            "",
            "llama.cpp side by side (`--peers`): llama-server built from llama-cpp-python "
            f"{build['llama_cpp_python']}'s vendored source (`cmake {' '.join(build['cmake'])}`), "
            f"{peers['threads']} threads on each side, "
            "the same prompts and token counts. What differs and cannot be made equal:",
            "",
            *(f"- {d}" for d in peers["differs"]),
        ]
    lines += ceilings_section(body, figures)
    extras = [(f, {k: x for k, x in f.extra.items() if k != "added_ms"}) for f in figures]
    extras = [(f, e) for f, e in extras if e]
    if extras:
        lines += ["", "Also measured:", ""]
        lines += [f"- {f.id}: " + ", ".join(f"{k} {x}" for k, x in e.items()) for f, e in extras]
    if body.get("errors"):
        lines += ["", "## Benchmarks that failed", ""] + [f"- {k}: {e}" for k, e in body["errors"].items()]
    if not body["plan"]["smoke"] and ANALYSIS.is_file():
        lines += ["", ANALYSIS.read_text(encoding="utf-8").strip()]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, body: dict[str, Any], figures: list[Figure]) -> None:
    """RESULTS.md from this run, keeping the sections other commands write (`./dev.sh bench --large`'s)."""
    kept = ""
    if path.is_file() and LARGE_SECTION in (old := path.read_text(encoding="utf-8")):
        kept = "\n" + LARGE_SECTION + old.partition(LARGE_SECTION)[2]
    path.write_text(markdown(body, figures) + kept, encoding="utf-8")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def rerender(results: Path, out: Path) -> None:
    """Write RESULTS.md again from a results.json (after editing ANALYSIS.md), without measuring anything."""
    body = json.loads(results.read_text(encoding="utf-8"))
    figures = []
    for f in body["figures"]:
        fields = {k: v for k, v in f.items() if k != "ratio"}
        figures.append(Figure(**fields))
    write_markdown(out, body, figures)


if __name__ == "__main__":
    import sys

    here = Path(__file__).resolve().parent
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "out" / "results.json"
    rerender(results, Path(sys.argv[2]) if len(sys.argv) > 2 else here / "RESULTS.md")
    print(f"wrote RESULTS.md from {results}")

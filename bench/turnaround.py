"""How much time to first token a closed loop's client turnaround costs, with no server at all.

    python -m bench.turnaround [IR folder] [--clients 4] [--turnarounds 0,6,20] [--rounds 3] [--requests 32]

The serving benchmark's baseline is an in-process pipeline whose clients send their next request the
moment their last ends, before the next step. A client outside the engine's loop (any HTTP client)
sends it a few milliseconds later, by when the next step has started, and a step is not interrupted:
the request waits for it. This runs the same in-process load with each client sending its next
request `turnaround` ms after its last ended (times counted from then), the turnarounds interleaved
round by round, and prints the median time to first token and the throughput of each: the share of
HTTP's added time to first token that is this wait, not the server's hand-overs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.load import InProcessEngine
from bench.prompts import PromptFactory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, help="an IR folder (default: the benchmark's fp16 base)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--turnarounds", default="0,6,20", help="milliseconds, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32, help="per run")
    args = parser.parse_args()
    folder = args.folder
    if folder is None:
        from bench.artifacts import bench_sources, ensure_artifacts

        folder = ensure_artifacts(bench_sources()).ir("base_fp16")
    turnarounds = [float(t) for t in args.turnarounds.split(",")]
    engine = InProcessEngine(folder)
    prompts = PromptFactory(folder / "tokenizer.json", 64)
    engine.run(prompts.batch(2 * args.clients), args.clients, 64)  # warm: kernels for every batch shape
    runs: dict[float, list[tuple[float, float]]] = {t: [] for t in turnarounds}
    for _ in range(args.rounds):
        for t in turnarounds:
            result = engine.run(prompts.batch(args.requests), args.clients, 64, turnaround_s=t / 1000)
            runs[t].append((result.ttft_p50 * 1000, result.tok_s))
    print(f"{folder.name}, {args.clients} clients, {args.requests} requests of 64 tokens a run, {args.rounds} rounds")
    for t, results in runs.items():
        ttfts, rates = [r[0] for r in results], [r[1] for r in results]
        print(f"turnaround {t:g} ms: time to first token p50 {statistics.median(ttfts):.0f} ms "
              f"(runs {', '.join(f'{x:.0f}' for x in ttfts)}), {statistics.median(rates):.0f} tok/s")


if __name__ == "__main__":
    main()

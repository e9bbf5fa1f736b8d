"""What a user would run instead: transformers generate on the merged model, C prompts per batch (a subprocess).

    python -m bench.torch_load --model DIR --max-tokens 64

Loads the model, prints {"ready": true}, then reads one JSON job a line ({"concurrency": C, "prompts":
[...]}) and prints its result a line: the same figures as bench.load (tokens/s over the wall time, TTFT
as the time to the first generated token of each batch). A process of its own, kept between jobs, so
the harness can alternate its loads with the server's in the same minutes, and torch's threads never
run beside OpenVINO's. Threads: all cores, or 1 when a calibration forward says that is faster
(see pick_threads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class FirstToken:
    """A generate() streamer that notes when the first new token of the batch arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: object) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt, call 2 the first new token
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def pick_threads(model: object, torch: object) -> dict[str, Any]:
    """Use all cores, or one thread when that is faster: OpenMP with every core loses up to 10x as soon as
    another process takes a core (measured here: a 64-token forward 4.8 s on 2 threads, 0.36 s on 1)."""
    ids = torch.randint(0, model.config.vocab_size, (1, 64))  # type: ignore[attr-defined]
    timings = {}
    for n in sorted({os.cpu_count() or 1, 1}, reverse=True):
        torch.set_num_threads(n)  # type: ignore[attr-defined]
        t = time.perf_counter()
        model(ids)  # type: ignore[operator]
        timings[n] = time.perf_counter() - t
    best = min(timings, key=timings.__getitem__)
    torch.set_num_threads(best)  # type: ignore[attr-defined]
    return {"used": best, "forward_64_tokens_s": {str(k): round(v, 3) for k, v in timings.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.torch_load", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.inference_mode():
        # One throw-away batch: the first generate() pays one-time allocation costs.
        warm = tokenizer(["warm up"], return_tensors="pt")
        model.generate(**warm, max_new_tokens=2, do_sample=False)
        print(json.dumps({"ready": True, "dtype": "float32"}), flush=True)
        for line in sys.stdin:
            job = json.loads(line)
            # Again before each load: another process taking a core in between changes the answer.
            threads = pick_threads(model, torch)
            result = run_load(model, tokenizer, job["prompts"], int(job["concurrency"]), args.max_tokens)
            print(json.dumps({"threads": threads, **result}), flush=True)
    return 0


def run_load(model: Any, tokenizer: Any, prompts: list[str], c: int, max_tokens: int) -> dict[str, Any]:
    """`prompts` in static batches of `c`, each generated to exactly `max_tokens` new tokens."""
    tokens = 0
    ttfts: list[float] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), c):
        batch = tokenizer(prompts[i : i + c], return_tensors="pt", padding=True)
        streamer = FirstToken()
        t = time.perf_counter()
        ids = model.generate(
            **batch,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,  # EOS ignored, as in every other measurement
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokens += (ids.shape[1] - batch["input_ids"].shape[1]) * ids.shape[0]
        ttfts.extend([(streamer.first or time.perf_counter()) - t] * ids.shape[0])
    wall = time.perf_counter() - start
    ttfts.sort()
    return {
        "concurrency": c,
        "requests": len(prompts),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 2),
        "ttft_p50_ms": round(ttfts[len(ttfts) // 2] * 1000, 1),
    }


if __name__ == "__main__":
    sys.exit(main())

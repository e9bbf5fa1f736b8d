"""What a user would run instead: transformers generate on the merged model, C prompts per batch (a subprocess).

    python -m bench.torch_load --model DIR --prompts PROMPTS.json --max-tokens 128 --concurrency 1 4 16

Prints JSON: per concurrency, the same figures as bench.load (tokens/s over the wall time, TTFT as
the time to the first generated token of each batch). Run apart from the harness so torch's
threads never compete with OpenVINO's in the other measurements. Threads: all cores, or 1 when a
calibration forward says that is faster (see pick_threads).
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
    parser.add_argument("--prompts", type=Path, required=True, help="JSON: {concurrency: [prompt, ...]}")
    parser.add_argument("--max-tokens", type=int, required=True)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts: dict[str, list[str]] = json.loads(args.prompts.read_text(encoding="utf-8"))
    out = {}
    with torch.inference_mode():
        # One throw-away batch: the first generate() pays one-time allocation costs.
        warm = tokenizer(["warm up"], return_tensors="pt")
        model.generate(**warm, max_new_tokens=2, do_sample=False)
        threads = {}
        for concurrency, batch_prompts in prompts.items():
            c = int(concurrency)
            # Again before each load: another process taking a core in between changes the answer.
            threads[concurrency] = pick_threads(model, torch)
            tokens = 0
            ttfts = []
            start = time.perf_counter()
            for i in range(0, len(batch_prompts), c):
                batch = tokenizer(batch_prompts[i : i + c], return_tensors="pt", padding=True)
                streamer = FirstToken()
                t = time.perf_counter()
                ids = model.generate(
                    **batch,
                    max_new_tokens=args.max_tokens,
                    min_new_tokens=args.max_tokens,  # EOS ignored, as in every other measurement
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=tokenizer.pad_token_id,
                )
                tokens += (ids.shape[1] - batch["input_ids"].shape[1]) * ids.shape[0]
                ttfts.extend([(streamer.first or time.perf_counter()) - t] * ids.shape[0])
            wall = time.perf_counter() - start
            ttfts.sort()
            out[concurrency] = {
                "concurrency": c,
                "requests": len(batch_prompts),
                "failed": 0,
                "completion_tokens": tokens,
                "wall_s": round(wall, 3),
                "tok_s": round(tokens / wall, 2),
                "ttft_p50_ms": round(ttfts[len(ttfts) // 2] * 1000, 1),
            }
    json.dump({"threads": threads, "dtype": "float32", "results": out}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

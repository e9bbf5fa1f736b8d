"""Profile the server's event-loop thread under load: where HTTP's added time to first token goes.

    python -m bench.profile_server [--smoke] [--clients 16] [--top 15]

Runs `python -m serving` under cProfile (wall clock, main thread: the asyncio loop), sends one
closed-loop load of streaming requests, stops the server and prints the functions with the most
time of their own. A syscall that releases the GIL (socket send, os.urandom) shows the time the
loop then waited to get the GIL back from another thread of the server (the engines run in
processes of their own: profile those with py-spy).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.artifacts import bench_sources, demo_sources, ensure_artifacts
from bench.load import http_load
from bench.prompts import PromptFactory
from bench.server import READY, free_port, publish


def profile(smoke: bool, clients: int, top: int) -> str:
    art = ensure_artifacts(demo_sources() if smoke else bench_sources())
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        repo, prof = Path(tmp) / "repo", Path(tmp) / "server.prof"
        publish(repo, "bench", art.merged_ir(0))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "serving", "--repository", str(repo),
             "--port", str(port), "--log-level", "warning"], env=env,
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + READY, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
            # One request alone first (see bench.server.Server.prime).
            httpx.post(url + "/v3/completions", json={"model": "bench", "prompt": "def", "max_tokens": 1}, timeout=120)
            prompts = PromptFactory(art.sources.base / "tokenizer.json", 16 if smoke else 64)
            result = asyncio.run(http_load(url, ["bench"], prompts.batch(clients), clients, 8 if smoke else 64))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        out = io.StringIO()
        pstats.Stats(str(prof), stream=out).sort_stats("tottime").print_stats(top)
    return f"load: {result.summary()}\n{out.getvalue()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_server", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny demo model")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(profile(args.smoke, args.clients, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

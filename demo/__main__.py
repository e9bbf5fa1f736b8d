"""The whole story in one command: make the demo sources, build, serve, ask both models.

    ./dev.sh demo [--repository models] [--port 8000] [--weight-format fp16] [--target-device CPU]

1. makes (or reuses) the local demo sources: a tiny Llama base, its tokenizer, a SQL LoRA adapter;
2. runs the `build_model` flow twice, as the reference demo runs export_model.py: `base_model`
   (the base alone) and `merged_model` (base + SQL adapter, merged);
3. starts the server on the repository, sends the reference demo's SQL request to both models and
   prints both completions;
4. prints the address of the compare page (GET /: both answers streamed side by side, with the
   validation reports) and, in a terminal, keeps serving until Ctrl-C; without one (a script, a
   test) it stops the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx

from demo.data import REFERENCE_PROMPT
from demo.make_sources import ensure_demo_sources


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="./dev.sh demo", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--weight-format", choices=["fp32", "fp16", "int8", "int4"])
    parser.add_argument("--target-device", default="CPU", choices=["CPU", "GPU", "NPU"])
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

    src = ensure_demo_sources()
    print(f"demo sources: {src.root}", flush=True)
    # Both builds in this process: one temporary Prefect server instead of one per command.
    from flows.build_model import build_model

    common = {"repository": args.repository, "target_device": args.target_device,
              "weight_format": args.weight_format, "prompts": src.sql_prompts}
    print("\n== build_model: base_model (the base alone)", flush=True)
    print(build_model(source_model=str(src.base), model_name="base_model", **common), flush=True)
    print("\n== build_model: merged_model (base + SQL adapter, merged)", flush=True)
    merged = build_model(source_model=str(src.base), adapters=[str(src.sql_adapter)], tokenizer=str(src.sql_adapter),
                         model_name="merged_model", **common)
    print(merged, flush=True)

    py = sys.executable
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [py, "-m", "serving", "--repository", str(args.repository), "--port", str(port), "--log-level", "warning"]
    )
    try:
        _wait_ready(url, server)
        texts = {}
        for model in ("merged_model", "base_model"):
            body = {"model": model, "prompt": REFERENCE_PROMPT, "max_tokens": args.max_tokens, "temperature": 0}
            r = httpx.post(f"{url}/v3/completions", json=body, timeout=60)
            r.raise_for_status()
            print(f"\n== {model}: the reference demo's request (POST {url}/v3/completions)")
            print(json.dumps(r.json(), indent=2), flush=True)
            texts[model] = r.json()["choices"][0]["text"]
        print("\n== side by side")
        for model, text in texts.items():
            print(f"{model:>13}: {text!r}")
        if texts["merged_model"] == texts["base_model"]:
            raise SystemExit("the merged model answered as the base model did: the adapter changed nothing")
        comparison = (f"{url}/?models=base_model,merged_model&prompt={quote(REFERENCE_PROMPT)}"
                      f"&mode=completions&max_tokens={args.max_tokens}&temperature=0")
        print(f"\n== the compare page: {url}/\n   this comparison there: {comparison}", flush=True)
        if sys.stdin.isatty() and sys.stdout.isatty():  # a person is watching: serve until they are done
            print("serving until Ctrl-C", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        else:
            print("(no terminal: the server stops now; run ./dev.sh demo in a terminal to keep it serving)", flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()

"""Serve a model repository over an OpenAI-compatible API.

    python -m serving --repository models --host 127.0.0.1 --port 8000 [--api-key-file KEY]

Every option also reads an environment variable (LORA_SERVE_REPOSITORY, LORA_SERVE_HOST,
LORA_SERVE_PORT, LORA_SERVE_API_KEY_FILE or LORA_SERVE_API_KEY, LORA_SERVE_MAX_QUEUE, LORA_SERVE_MAX_NUM_SEQS,
LORA_SERVE_MAX_BODY_BYTES, LORA_SERVE_MAX_ADAPTER_BYTES, LORA_SERVE_CPU_RUNTIME_CACHE, LORA_SERVE_TIME_SLICE,
LORA_SERVE_POLL_INTERVAL, LORA_SERVE_LOG_LEVEL);
a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from serving.app import Settings, create_app
from serving.engine_core import EngineSettings


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"LORA_SERVE_{name}", default)


def _int_or_none(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[3:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repository", type=Path, default=_env("REPOSITORY"), help="the model repository folder")
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(_env("PORT", "8000") or 8000))
    parser.add_argument("--api-key-file", type=Path, default=_env("API_KEY_FILE"),
                        help="a file holding the API key clients must send as a Bearer token")
    parser.add_argument("--max-queue", type=int, default=int(_env("MAX_QUEUE", "256") or 256),
                        help="requests waiting or running per model before 503")
    parser.add_argument("--max-num-seqs", type=int, default=int(_env("MAX_NUM_SEQS", "64") or 64))
    parser.add_argument("--max-body-bytes", type=int, default=int(_env("MAX_BODY_BYTES", str(4 << 20)) or 4 << 20))
    parser.add_argument("--time-slice", type=float, default=float(_env("TIME_SLICE", "0.5") or 0.5),
                        help="seconds an adapter's batch keeps admitting while other adapters wait")
    parser.add_argument("--max-adapter-bytes", type=int, default=int(_env("MAX_ADAPTER_BYTES") or 1 << 30),
                        help="refuse an adapter whose weights file is larger (default 1 GiB)")
    parser.add_argument("--cpu-runtime-cache", type=int, default=_int_or_none(_env("CPU_RUNTIME_CACHE")),
                        help="OpenVINO's compiled-kernel cache entries (default: OpenVINO's 5000; 0 keeps memory flat)")
    parser.add_argument("--poll-interval", type=float, default=float(_env("POLL_INTERVAL", "2") or 2))
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    if args.repository is None:
        parser.error("--repository (or LORA_SERVE_REPOSITORY) is required")
    if not args.repository.is_dir():
        parser.error(f"--repository {args.repository} is not a folder")
    api_key = _env("API_KEY")
    if args.api_key_file is not None:
        try:
            api_key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            parser.error(f"--api-key-file {args.api_key_file}: {e.strerror}")
        if not api_key:
            parser.error(f"--api-key-file {args.api_key_file} is empty")
    settings = Settings(
        repository=args.repository.resolve(),
        api_key=api_key or None,
        max_body_bytes=args.max_body_bytes,
        poll_interval=args.poll_interval,
        engine=EngineSettings(
            max_queue=args.max_queue,
            max_num_seqs=args.max_num_seqs,
            time_slice=args.time_slice,
            max_adapter_bytes=args.max_adapter_bytes,
            cpu_runtime_cache=args.cpu_runtime_cache,
        ),
    )
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level, lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())

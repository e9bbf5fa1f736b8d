"""Serve a model repository over an OpenAI-compatible API.

    python -m serving --repository models --host 127.0.0.1 --port 8000 [--api-key-file KEY]
    python -m serving --repository s3://bucket/models [--cache-dir DIR] [--poll-interval 2]
        (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION or AWS_PROFILE)

Every option also reads an environment variable (LORA_SERVE_REPOSITORY, LORA_SERVE_HOST,
LORA_SERVE_PORT, LORA_SERVE_API_KEY_FILE or LORA_SERVE_API_KEY, LORA_SERVE_MAX_QUEUE, LORA_SERVE_MAX_NUM_SEQS,
LORA_SERVE_MAX_BODY_BYTES, LORA_SERVE_MAX_ADAPTER_BYTES, LORA_SERVE_CPU_RUNTIME_CACHE, LORA_SERVE_TIME_SLICE,
LORA_SERVE_POLL_INTERVAL, LORA_SERVE_CACHE_DIR, LORA_SERVE_LOG_LEVEL);
a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

import uvicorn

from modelrepo import is_object_store
from serving.app import Settings, create_app
from serving.engine_core import EngineSettings

T = TypeVar("T")


# The defaults are the settings classes' own, written once there.
_ENGINE = EngineSettings()
_SERVER = {f.name: f.default for f in fields(Settings)}


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"LORA_SERVE_{name}", default)


def _setting(name: str, cast: Callable[[str], T], default: T) -> T:
    """LORA_SERVE_<name> if set and not empty, else `default`."""
    value = _env(name)
    return default if value in (None, "") else cast(value)


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[3:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repository", default=_env("REPOSITORY"),
                        help="the model repository: a folder, or s3://bucket/prefix")
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=_setting("PORT", int, 8000))
    parser.add_argument("--api-key-file", type=Path, default=_env("API_KEY_FILE"),
                        help="a file holding the API key clients must send as a Bearer token")
    parser.add_argument("--max-queue", type=int, default=_setting("MAX_QUEUE", int, _ENGINE.max_queue),
                        help="requests waiting or running per model before 503")
    parser.add_argument("--max-num-seqs", type=int, default=_setting("MAX_NUM_SEQS", int, _ENGINE.max_num_seqs))
    parser.add_argument("--max-body-bytes", type=int,
                        default=_setting("MAX_BODY_BYTES", int, _SERVER["max_body_bytes"]))
    parser.add_argument("--time-slice", type=float, default=_setting("TIME_SLICE", float, _ENGINE.time_slice),
                        help="seconds an adapter's batch keeps admitting while other adapters wait")
    parser.add_argument("--max-adapter-bytes", type=int,
                        default=_setting("MAX_ADAPTER_BYTES", int, _ENGINE.max_adapter_bytes),
                        help="refuse an adapter whose weights file is larger (default 1 GiB)")
    parser.add_argument("--cpu-runtime-cache", type=int,
                        default=_setting("CPU_RUNTIME_CACHE", int, _ENGINE.cpu_runtime_cache),
                        help="OpenVINO's compiled-kernel cache entries (default 0: memory stays flat; OpenVINO's own "
                             "default is 5000, a few %% faster, memory growing with each new batch shape until full)")
    parser.add_argument("--engine-threads", type=int, default=_setting("ENGINE_THREADS", int, _ENGINE.threads),
                        help="compute threads of each model's engine (default: OpenVINO's, every core); fewer leaves "
                             "cores to the server and to other work on the machine")
    parser.add_argument("--poll-interval", type=float,
                        default=_setting("POLL_INTERVAL", float, _SERVER["poll_interval"]),
                        help="seconds between checks of the index (a conditional GET on a bucket)")
    parser.add_argument("--cache-dir", type=Path, default=_setting("CACHE_DIR", Path, _SERVER["cache_dir"]),
                        help="where a bucket's versions are copied to be loaded (one folder per server)")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    if args.repository is None:
        parser.error("--repository (or LORA_SERVE_REPOSITORY) is required")
    repository: Path | str = args.repository
    if not is_object_store(repository):
        if "://" in repository:
            parser.error(f"--repository {repository}: only folders and s3://bucket/prefix are supported")
        repository = Path(repository).resolve()
        if not repository.is_dir():
            parser.error(f"--repository {args.repository} is not a folder")
    if args.engine_threads is not None and not args.engine_threads > 0:
        parser.error(f"--engine-threads must be positive, got {args.engine_threads}")
    if not args.poll_interval > 0:
        parser.error(f"--poll-interval must be positive, got {args.poll_interval}")
    api_key = _env("API_KEY")
    if args.api_key_file is not None:
        try:
            api_key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            parser.error(f"--api-key-file {args.api_key_file}: {e.strerror}")
        if not api_key:
            parser.error(f"--api-key-file {args.api_key_file} is empty")
    settings = Settings(
        repository=repository,
        api_key=api_key or None,
        max_body_bytes=args.max_body_bytes,
        poll_interval=args.poll_interval,
        cache_dir=args.cache_dir.expanduser().resolve(),
        engine=EngineSettings(
            max_queue=args.max_queue,
            max_num_seqs=args.max_num_seqs,
            time_slice=args.time_slice,
            max_adapter_bytes=args.max_adapter_bytes,
            cpu_runtime_cache=args.cpu_runtime_cache,
            threads=args.engine_threads,
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

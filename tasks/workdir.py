"""Step outputs in a work folder: named by a hash of their inputs, written whole or not at all, cached by Prefect."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import Task

STALE_SCRATCH_SECONDS = 6 * 3600
P = ParamSpec("P")
R = TypeVar("R")


def default_work_dir() -> Path:
    return Path(os.environ.get("LORA_WORK_DIR", Path.home() / ".cache" / "lora-pipeline" / "work"))


def input_key(*parts: Any) -> str:
    """A short stable hash of a step's inputs (revisions, file hashes, options)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_digest(path: Path) -> str:
    """sha256 of a small file's content (a prompt set), for cache and build keys."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def atomic_output(out_dir: Path) -> Iterator[Path]:
    """Yield a scratch folder that becomes `out_dir` only when the block succeeds, so `out_dir` is always whole."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Scratch folders this old belong to runs that were killed; younger ones may be a live run's.
    for stale in out_dir.parent.glob(f".{out_dir.name}.*"):
        if time.time() - stale.stat().st_mtime > STALE_SCRATCH_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        yield tmp
        if out_dir.exists():  # a concurrent run of the same inputs finished first: same content
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def output_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a step writing `out_dir`, whose name holds the hash of the step's inputs.

    Call the step through `fresh_unless_present`, so a cached result naming a folder that is gone is
    never handed back.
    """
    return f"{context.task.name}-{input_key(str(Path(parameters['out_dir']).resolve()))}"


def fresh_unless_present(step: Task[P, R], out_dir: Path) -> Task[P, R]:
    """`step`, told to run again (and overwrite its cache record) when the folder its result names is gone.

    When the folder is there, `step` as it is: its own `refresh_cache`, or Prefect's setting
    (PREFECT_TASKS_REFRESH_CACHE), decides whether a cached result is used.
    """
    return step if out_dir.is_dir() else step.with_options(refresh_cache=True)

"""Step outputs in a work folder: named by a hash of what determines them, written whole or never, cached by Prefect.

What determines a step's output is its inputs and options, the versions of the tools it calls and
the project's own code that calls them (`Step`): all of it goes into the folder's name and the
task's cache key, as Prefect's default cache policy hashes a task's inputs and source, so that an
upgraded tool or a changed step never reuses what the old one built.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import Task

STALE_SCRATCH_SECONDS = 6 * 3600
P = ParamSpec("P")
R = TypeVar("R")
# Every tool that shapes a build (the manifest records them all; each step keys on those it calls).
TOOLS = (
    "openvino",
    "openvino-genai",
    "openvino-tokenizers",
    "optimum-intel",
    "optimum",
    "nncf",
    "transformers",
    "tokenizers",
    "safetensors",
    "peft",
    "torch",
    "huggingface_hub",
)


def installed_version(name: str) -> str:
    """The installed version of the package `name` (read from its metadata, no import), or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def tool_versions(names: Iterable[str] = TOOLS) -> dict[str, str]:
    """The installed versions of `names` (default: every tool that shapes a build)."""
    return {name: installed_version(name) for name in names}


def code_digest(modules: Iterable[str]) -> str:
    """sha256 over the source files of the project's `modules` (found, not imported)."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"module {name!r}: no source file to hash")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes() + b"\0")
    return digest.hexdigest()


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


@dataclass(frozen=True)
class Step:
    """A build step's output beyond its inputs: the tools it calls (`tools`, names in TOOLS) and the
    project's modules whose code decides what it writes (`modules`)."""

    name: str  # its work folders are `<name>-<key>`
    tools: tuple[str, ...]
    modules: tuple[str, ...]

    def __post_init__(self) -> None:
        if unknown := set(self.tools) - set(TOOLS):
            raise ValueError(f"step {self.name}: tools {sorted(unknown)} are not in TOOLS, so no manifest records them")

    def key(self, *inputs: Any) -> str:
        """A hash of `inputs` (revisions, file hashes, options), the step's tool versions and its code."""
        return input_key(self.name, inputs, tool_versions(self.tools), code_digest(self.modules))

    def folder(self, work: Path, *inputs: Any) -> Path:
        """Where the step's output for `inputs` goes in `work`."""
        return work / f"{self.name}-{self.key(*inputs)}"

    def cache_key(self, context: Any, parameters: dict[str, Any]) -> str:
        """Prefect cache key of the task writing `parameters["out_dir"]`: every parameter, the tools and the code.

        Call the task through `fresh_unless_present`, so a cached result naming a folder that is gone is
        never handed back.
        """
        out_dir = str(Path(parameters["out_dir"]).resolve())
        return f"{context.task.name}-{self.key(out_dir, sorted(parameters.items()))}"


def fresh_unless_present(step: Task[P, R], out_dir: Path) -> Task[P, R]:
    """`step`, told to run again (and overwrite its cache record) when the folder its result names is gone.

    When the folder is there, `step` as it is: its own `refresh_cache`, or Prefect's setting
    (PREFECT_TASKS_REFRESH_CACHE), decides whether a cached result is used.
    """
    return step if out_dir.is_dir() else step.with_options(refresh_cache=True)

"""Helpers for tests: build a small served repository from the demo sources without Prefect."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import modelrepo
from demo.make_sources import DemoSources
from modelrepo.numerics import default_numerics
from tasks.export import export_openvino
from tasks.merge import merge_adapters
from tasks.report import load_prompts

# The log files of the servers the tests start (tests/serving/conftest.py's start_server): a failed test shows
# what a crashed engine process wrote there (tests/conftest.py's report hook).
SERVER_LOGS = pytest.StashKey[list[Path]]()
CRASH_MARKS = ("Fatal Python error", "the engine process exited with code")


def crash_reports(logs: list[Path], since: dict[Path, int], lines: int = 60) -> list[tuple[str, str]]:
    """(title, text) for each log that records an engine crash after byte `since[log]` (0 for a log not in it):
    from its first crash line on, `lines` at most."""
    reports = []
    for log in logs:
        if not log.exists():
            continue
        with open(log, "rb") as f:
            f.seek(since.get(log, 0))
            text = f.read().decode(errors="replace").splitlines()
        at = next((i for i, line in enumerate(text) if any(m in line for m in CRASH_MARKS)), None)
        if at is not None:
            reports.append((f"engine crash in {log}", "\n".join(text[max(at - 5, 0) : at + lines])))
    return reports


def prompt_texts(*paths: Path) -> list[str]:
    """The prompts of JSONL prompt sets, in order."""
    return [p.prompt for path in paths for p in load_prompts(path)]


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "the condition") -> None:
    """Poll `condition` every 0.1 s until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def metric(url: str, name: str, model: str, api_key: str | None = None) -> float:
    """One per-model figure from a server's /metrics (0 before the model has any)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(f"{url}/metrics", headers=headers).text
    m = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@dataclass(frozen=True)
class DemoRepository:
    root: Path
    sources: DemoSources

    def copy_to(self, dest: Path) -> Path:
        shutil.copytree(self.root, dest, dirs_exist_ok=True)
        return dest


def pinned_manifest() -> dict[str, object]:
    """A manifest for versions the tests publish by hand: pinned to the suite's numerics (LORA_INFERENCE_PRECISION)."""
    return {"built_by": "tests", "numerics": default_numerics().to_json()}


def exact_numerics() -> bool:
    """Whether the suite computes in f32, where a runtime adapter's greedy output equals the merged model's exactly.

    In bf16 the two round differently (the adapter's delta is added at runtime), so tests compare
    them within the gate's tolerance instead.
    """
    return default_numerics().inference_precision == "f32"


def same_greedy_answer(runtime_adapter: str, merged: str) -> bool:
    """A runtime adapter's answer against the merged model's: equal in f32; in bf16 within rounding (token F1 0.8)."""
    if exact_numerics():
        return runtime_adapter == merged
    from tasks.gate import token_f1

    return token_f1(runtime_adapter, merged) >= 0.8


def build_demo_repository(sources: DemoSources, root: Path, weight_format: str = "fp16") -> DemoRepository:
    work = Path(tempfile.mkdtemp(prefix="demo-repo-"))
    try:
        export_openvino(sources.base, work / "base_ir", weight_format)  # type: ignore[arg-type]
        modelrepo.publish_version(root, "base_model", "base", work / "base_ir", pinned_manifest())
        merge_adapters(sources.base, [sources.sql_adapter], work / "merged")
        export_openvino(work / "merged", work / "merged_ir", weight_format)  # type: ignore[arg-type]
        modelrepo.publish_version(root, "merged_model", "merged", work / "merged_ir", pinned_manifest())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DemoRepository(root, sources)

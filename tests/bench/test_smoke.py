"""The benchmarks keep working: `python -m bench --smoke` end to end on the tiny demo model, every figure recorded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_run_records_every_figure_with_its_baseline(
    demo_sources: object, prefect_server: None, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    # The flow run of the build benchmark reports to this session's Prefect server instead of starting its own.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    body = json.loads((tmp_path / "smoke" / "results.json").read_text(encoding="utf-8"))
    assert body["errors"] == {}
    figures = {f["id"]: f for f in body["figures"]}
    assert set(body["expected_figures"]) <= set(figures), sorted(set(body["expected_figures"]) - set(figures))
    for fid, f in figures.items():
        assert isinstance(f["value"], (int, float)) and math.isfinite(f["value"]), (fid, f)
        assert isinstance(f["baseline"], (int, float)) and math.isfinite(f["baseline"]), (fid, f)
        assert f["baseline_name"], fid
        if f["baseline"]:
            assert f["ratio"] == pytest.approx(f["value"] / f["baseline"], rel=1e-3), fid
    # Real work was measured: tokens streamed over HTTP, the reload answered from the new version, no failures.
    serving = body["details"]["serving"]
    assert all(run["completion_tokens"] > 0 and run["failed"] == 0 for c in serving.values() for run in c["http"])
    assert figures["reload.failed_requests"]["value"] == 0
    assert body["details"]["reload"]["commit_to_first_answer_s"] > 0
    staged = body["details"]["reload"]["staged"]  # promoted: answered from the engine built ahead, nothing failed
    assert staged["commit_to_first_answer_s"] > 0 and staged["failed_during"] == 0
    assert body["details"]["build"]["flow"]["returncode"] == 0

    table = (tmp_path / "smoke" / "RESULTS.md").read_text(encoding="utf-8")
    assert body["machine"]["cpu"] in table
    rows = table.partition("| Figure |")[2].partition("\n\n")[0]
    assert rows.count("\n| ") == len(figures)  # one row a figure
    # The machine's ceilings, measured, and each side's share of them in a table of their own.
    ceilings = body["ceilings"]
    assert ceilings["read_gb_s"] > 0 and ceilings["f32_gflop_s"] > 0 and len(ceilings["measured"]) == 2
    shares = table.partition("## Against this machine's ceilings")[2].partition("\n\n| what |")[2]
    assert "| one stream: weights read | ours in process" in shares and "the target: 3x transformers" in shares

"""The ops tests' view of Prefect: its command line as a user runs it, and a flow run's outcome read back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def prefect_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def run_deployment(
    cwd: Path,
    env: dict[str, str],
    name: str,
    pool: str = "lora-builds",
    params: dict[str, str] | None = None,
    worker_cwd: Path | None = None,
    worker_env: dict[str, str] | None = None,
) -> str:
    """Start a run of deployment `name`, then one worker of `pool` (in its own folder and environment if given)."""
    args = [f"--param={k}={v}" for k, v in (params or {}).items()]
    out = prefect_cli(["deployment", "run", name, *args], cwd, env)
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    prefect_cli(["worker", "start", "--pool", pool, "--run-once"], worker_cwd or cwd, worker_env or env, timeout=900)
    return run_id


async def state_and_artifacts(run_id: str) -> tuple[str, dict[str, list]]:
    """The run's final state and its artifacts by type (markdown, table, link, progress)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        run = await client.read_flow_run(run_id)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    by_type: dict[str, list] = {}
    for a in artifacts:
        by_type.setdefault(a.type, []).append(a)
    return run.state.type.value, by_type

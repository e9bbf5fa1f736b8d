"""prefect.yaml as a user runs it: deploy to a Prefect server, run a deployment on a process worker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
CODE = ["flows", "tasks", "modelrepo", "demo", "prefect.yaml"]


def _prefect(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def deployed(prefect_server: None, demo_sources, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A copy of the checkout, its deployments registered on the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    project = tmp_path_factory.mktemp("project")
    for name in CODE:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, project / name)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PWD": str(project)}
    env.pop("PYTHONPATH", None)  # the worker must find the code in its working directory, as a user's would
    _prefect(["work-pool", "create", "lora-builds", "--type", "process"], project, env)
    _prefect(["deploy", "--all"], project, env)
    return project, env


def _run_deployment(project: Path, env: dict[str, str], name: str) -> str:
    out = _prefect(["deployment", "run", name], project, env)
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    _prefect(["worker", "start", "--pool", "lora-builds", "--run-once"], project, env, timeout=900)
    return run_id


async def _state_and_artifacts(run_id: str) -> tuple[str, dict[str, list]]:
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


async def _events(prefix: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        r = await client._client.post("/events/filter", json={"filter": {"event": {"prefix": [prefix]}}})
        r.raise_for_status()
        return r.json()["events"]


async def test_a_deployment_runs_on_a_worker_publishes_and_reports(deployed: tuple[Path, dict]) -> None:
    project, env = deployed
    run_id = _run_deployment(project, env, "build_model/base-model")
    state, artifacts = await _state_and_artifacts(run_id)
    assert state == "COMPLETED"
    index = json.loads((project / "models" / "index.json").read_text())
    assert index["models"]["base_model"]["version"] == 1
    version = project / "models" / "base_model" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["build"]["flow_run"] == run_id
    # The UI's view of the run: the validation report, the live version, a finished progress bar.
    markdown = {a.key: a.data for a in artifacts["markdown"]}
    assert "validation-base-model" in markdown and "agreement" in markdown["validation-base-model"]
    assert "base_model version 1 is live" in markdown["published-base-model"]
    assert [a.data for a in artifacts["table"]]
    assert f"]({version.resolve().as_uri()})" in markdown["published-base-model-folder"]  # a link artifact
    assert [a.data for a in artifacts["progress"]] == [100.0]
    # Automations can react to the publish.
    events = await _events("lora.model.published")
    events = [e for e in events if e["resource"]["prefect.resource.name"] == "base_model"]
    assert events and events[-1]["payload"]["version"] == 1 and events[-1]["resource"]["lora.version"] == "1"


async def test_the_adapter_deployment_publishes_onto_the_built_base(deployed: tuple[Path, dict]) -> None:
    project, env = deployed
    if not (project / "models" / "index.json").exists():
        _run_deployment(project, env, "build_model/base-model")
    run_id = _run_deployment(project, env, "publish_adapter/spell-adapter")
    state, _ = await _state_and_artifacts(run_id)
    assert state == "COMPLETED"
    entry = json.loads((project / "models" / "index.json").read_text())["models"]["spell_adapter"]
    assert (entry["kind"], entry["base"], entry["alpha"]) == ("adapter", "base_model", 2.0)


async def test_a_second_run_without_upstream_change_is_up_to_date(deployed: tuple[Path, dict]) -> None:
    project, env = deployed
    index = project / "models" / "index.json"
    if not index.exists():
        _run_deployment(project, env, "build_model/base-model")
    before = json.loads(index.read_text())
    run_id = _run_deployment(project, env, "build_model/base-model")
    state, _ = await _state_and_artifacts(run_id)
    assert state == "COMPLETED"
    assert json.loads(index.read_text()) == before  # no new version, no index commit

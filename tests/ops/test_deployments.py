"""prefect.yaml as a user runs it: deploy to a Prefect server, run a deployment on a process worker."""

from __future__ import annotations

import json
from pathlib import Path

from tests.ops.cli import run_deployment, state_and_artifacts


async def _events(prefix: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        r = await client._client.post("/events/filter", json={"filter": {"event": {"prefix": [prefix]}}})
        r.raise_for_status()
        return r.json()["events"]


async def test_a_deployment_runs_on_a_worker_publishes_and_reports(deployed: tuple[Path, dict]) -> None:
    project, env = deployed
    run_id = run_deployment(project, env, "build_model/base-model")
    state, artifacts = await state_and_artifacts(run_id)
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
        run_deployment(project, env, "build_model/base-model")
    run_id = run_deployment(project, env, "publish_adapter/spell-adapter")
    state, _ = await state_and_artifacts(run_id)
    assert state == "COMPLETED"
    entry = json.loads((project / "models" / "index.json").read_text())["models"]["spell_adapter"]
    assert (entry["kind"], entry["base"], entry["alpha"]) == ("adapter", "base_model", 2.0)


async def test_a_second_run_without_upstream_change_is_up_to_date(deployed: tuple[Path, dict]) -> None:
    project, env = deployed
    index = project / "models" / "index.json"
    if not index.exists():
        run_deployment(project, env, "build_model/base-model")
    before = json.loads(index.read_text())
    run_id = run_deployment(project, env, "build_model/base-model")
    state, _ = await state_and_artifacts(run_id)
    assert state == "COMPLETED"
    assert json.loads(index.read_text()) == before  # no new version, no index commit

"""The build_model flow end to end on real Prefect runs and real exports, and each way it must fail."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import modelrepo
from demo.data import REFERENCE_PROMPT
from demo.make_sources import DemoSources
from flows.build_model import build_model, main
from modelrepo.numerics import default_numerics, engine_properties, pinned
from tasks.errors import AdapterMismatch, PipelineError, SourceError, ValidationFailed
from tasks.export import read_weight_format
from tasks.publish import Published
from tests.support import DemoRepository
from tests.tasks.hub import FakeHub
from tests.tasks.makers import pickled_adapter, tiny_llama, untrained_adapter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def task_states(flow_state: Any, expected: set[str]) -> dict[str, str]:
    """Task run name -> final state name, for one flow run, read back from the Prefect server.

    Task runs reach the server as events, a moment after the flow returns: wait for the expected ones.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    states: dict[str, str] = {}
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
            )
            states = {r.name: r.state.name for r in runs if r.state and r.state.is_final()}
            if expected <= set(states):
                break
            time.sleep(0.2)
    return states


def greedy(folder: Path, prompt: str) -> str:
    """The version's greedy answer, computed with the numerics its manifest pins (as a server computes it)."""
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.apply_chat_template = 32, False
    numerics = engine_properties(pinned(modelrepo.read_manifest(folder)) or default_numerics())
    return str(openvino_genai.LLMPipeline(str(folder), "CPU", numerics).generate(prompt, config))


@pytest.fixture
def hub(demo_sources: DemoSources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The SQL adapter on a loopback hub (HF_ENDPOINT), as yard1/llama-2-7b-sql-lora-test is in the reference demo."""
    server = FakeHub()
    server.add("acme/sql-lora", main=demo_sources.sql_adapter)
    with server as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        yield server


def test_fp16_merged_build_is_published_with_manifest_and_report_and_reused(
    demo_sources: DemoSources, hub: FakeHub, tmp_path: Path, work: Path
) -> None:
    from prefect.client.orchestration import get_client

    repo = tmp_path / "models"
    args = dict(
        source_model=str(demo_sources.base),
        adapters=["acme/sql-lora@main"],  # from the hub, pinned to the commit main points at
        model_name="merged_model",
        repository=repo,
        work_dir=work,
    )
    published = build_model(**args)
    assert (published.version, published.published) == (1, True)
    folder = repo / "merged_model" / "1"
    assert modelrepo.verify_version(folder) == []
    assert modelrepo.read_index(repo).entries["merged_model"].kind == "merged"
    assert json.loads((repo / "config.json").read_text())["model_config_list"][0]["config"]["name"] == "merged_model"

    manifest = modelrepo.read_manifest(folder)
    assert manifest["weight_format"] == "fp16" and manifest["target_device"] == "CPU"
    assert manifest["sources"]["base"]["revision"].startswith("sha256:")
    adapter = manifest["sources"]["adapters"][0]
    assert adapter["repo_id"] == "acme/sql-lora" and adapter["requested_revision"] == "main"
    assert len(adapter["revision"]) == 40 and adapter["revision"] != "main"
    adapter_hash = modelrepo.manifest.sha256_file(demo_sources.sql_adapter / "adapter_model.safetensors")
    assert manifest["sources"]["adapters"][0]["files"]["adapter_model.safetensors"] == adapter_hash
    assert set(manifest["tools"]) >= {"openvino", "optimum-intel", "nncf", "transformers", "peft", "torch"}
    validation = manifest["validation"]
    numerics = default_numerics()
    assert manifest["numerics"] == validation["numerics"] == numerics.to_json()
    assert json.dumps(numerics.plugin_config()) in (folder / "graph.pbtxt").read_text()
    bounds = validation["bounds"]
    assert validation["passed"] and validation["agreement"] >= validation["min_agreement"] == bounds["min_agreement"]
    assert validation["kld_mean"] <= bounds["max_kld_mean"] and validation["kld_p99"] <= bounds["max_kld_p99"]
    # The adapter is trained on these prompts: it answers them as their references say, the base does not.
    assert validation["scores"]["model_f1"] > validation["scores"]["base_f1"]
    # What each stage cost, measured while it ran.
    stages = {s["name"]: s for s in manifest["stages"]}
    assert list(stages) == ["resolve", "fetch", "merge", "export", "validate"]
    assert all(s["seconds"] >= 0 and 0 < s["peak_anon_gb"] <= s["peak_rss_gb"] for s in stages.values())
    assert stages["export"]["estimate_gb"] > 0 and stages["validate"]["estimate_gb"] > 0
    assert validation["prompts_changed_by_adapters"] >= validation["min_changed"]
    assert "| prompt | base output | merged output | agreement |" in (folder / "validation.md").read_text()

    # The served model answers the reference demo's prompt with SQL, unlike the base model.
    row = validation["rows"][0]
    assert row["prompt"] == REFERENCE_PROMPT
    merged_text = greedy(folder, REFERENCE_PROMPT)
    assert merged_text == row["model_output"] and "SELECT" in merged_text and "FROM" in merged_text
    assert "SELECT" not in row["base_output"]

    # Same inputs again: an identical build is live, so nothing new is published.
    again = build_model(**args)
    assert (again.version, again.published) == (1, False)
    # --overwrite publishes anyway, reusing every finished step from Prefect's cache.
    state = build_model(**args, overwrite=True, return_state=True)
    assert state.result().version == 2 and modelrepo.read_index(repo).entries["merged_model"].version == 2
    states = task_states(state, {"merge", "export-fp16", "validate", "publish-merged_model"})
    assert states["merge"] == states["export-fp16"] == states["validate"] == "Cached", states
    with get_client(sync_client=True) as client:
        artifacts = {a.key: str(a.data) for a in client.read_latest_artifacts()}
    assert "merged_model version 2 is live" in artifacts["published-merged-model"]
    assert "| prompt | base output | merged output | agreement |" in artifacts["validation-merged-model"]
    assert states["publish-merged_model"] == "Completed"
    # --stage: the version is published beside the live one; a promotion makes it live.
    staged = build_model(**args, overwrite=True, stage=True)
    index = modelrepo.read_index(repo)
    assert (staged.version, staged.staged) == (3, True) and "is staged" in str(staged)
    assert index.entries["merged_model"].version == 2 and index.staged["merged_model"].version == 3
    with get_client(sync_client=True) as client:
        artifacts = {a.key: str(a.data) for a in client.read_latest_artifacts()}
    assert "merged_model version 3 is staged" in artifacts["published-merged-model"]
    assert "modelrepo promote" in artifacts["published-merged-model"]
    assert modelrepo.promote(repo, "merged_model").version == 3


def test_an_upgraded_tool_rebuilds_the_steps_it_shapes_and_the_manifest_records_it(
    demo_sources: DemoSources, tmp_path: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import workdir

    repo = tmp_path / "models"
    args = dict(source_model=str(demo_sources.base), adapters=[str(demo_sources.sql_adapter)],
                model_name="merged_model", repository=repo, work_dir=work)
    assert build_model(**args).version == 1
    folders = {p.name for p in work.iterdir()}
    # peft upgraded (as installed_version reports it; the manifest and every key read it there)
    installed = workdir.installed_version
    upgraded = {"peft": "99.0+upgraded"}
    monkeypatch.setattr(workdir, "installed_version", lambda name: upgraded.get(name) or installed(name))
    state = build_model(**args, return_state=True)
    published = state.result()
    # not up to date (the build key holds the tools), and nothing reused: merged again, so exported again
    assert (published.version, published.published) == (2, True)
    states = task_states(state, {"merge", "export-fp16", "validate"})
    assert states["merge"] == states["export-fp16"] == states["validate"] == "Completed", states
    new = sorted({p.name for p in work.iterdir()} - folders)
    assert [n.split("-")[0] for n in new] == ["ir", "merged"], new
    manifest = modelrepo.read_manifest(repo / "merged_model" / "2")
    assert manifest["tools"]["peft"] == "99.0+upgraded"
    assert modelrepo.read_manifest(repo / "merged_model" / "1")["tools"]["peft"] == installed("peft")


def test_gpu_target_gives_int8_weights(demo_sources: DemoSources, tmp_path: Path, work: Path) -> None:
    repo = tmp_path / "models"
    published = build_model(  # as the reference demo's GPU command: the adapter's tokenizer too
        source_model=str(demo_sources.base),
        adapters=[str(demo_sources.sql_adapter)],
        tokenizer=str(demo_sources.sql_adapter),
        model_name="merged_model",
        repository=repo,
        target_device="GPU",
        work_dir=work,
    )
    manifest = modelrepo.read_manifest(published.path)
    fmt, types = read_weight_format(published.path / "openvino_model.xml")
    assert fmt == manifest["weight_format"] == "int8" and types.get("u8", 0) > 0
    assert manifest["target_device"] == "GPU" and 'device: "GPU"' in (published.path / "graph.pbtxt").read_text()
    assert manifest["validation"]["passed"] and manifest["validation"]["bounds"]["min_agreement"] == 0.97
    assert manifest["sources"]["tokenizer"]["path"] == str(demo_sources.sql_adapter)
    assert (published.path / "openvino_tokenizer.xml").is_file() and (published.path / "tokenizer.json").is_file()


def test_base_only_build_validates_against_the_torch_base(flow_built_base: Published) -> None:
    manifest = modelrepo.read_manifest(flow_built_base.path)
    assert manifest["kind"] == "base" and manifest["sources"]["adapters"] == []
    assert manifest["validation"]["passed"] and manifest["validation"]["prompts_changed_by_adapters"] is None
    assert manifest["validation"]["kind"] == "base"
    assert "SELECT" not in greedy(flow_built_base.path, REFERENCE_PROMPT)


@pytest.fixture
def served(demo_repository: DemoRepository, tmp_path: Path) -> Path:
    """A copy of the served demo repository: a failed build must leave it exactly as it was."""
    return demo_repository.copy_to(tmp_path / "models")


def unchanged(repo: Path, before: dict[str, bytes]) -> bool:
    return {p: (repo / p).read_bytes() for p in before} == before and sorted(
        p.name for p in (repo / "merged_model").iterdir()
    ) == ["1"]


def snapshot(repo: Path) -> dict[str, bytes]:
    return {p: (repo / p).read_bytes() for p in ("index.json", "config.json")}


def test_missing_source_fails_naming_it(demo_sources: DemoSources, served: Path, tmp_path: Path) -> None:
    before = snapshot(served)
    with pytest.raises(SourceError, match=r"adapter .*/no-such-adapter: no such folder"):
        build_model(
            source_model=str(demo_sources.base),
            adapters=[str(tmp_path / "no-such-adapter")],
            model_name="merged_model",
            repository=served,
        )
    assert unchanged(served, before)


def test_pickle_only_adapter_fails_without_the_flag(demo_sources: DemoSources, served: Path, tmp_path: Path) -> None:
    before = snapshot(served)
    adapter = pickled_adapter(demo_sources.sql_adapter, tmp_path / "pickled")
    with pytest.raises(SourceError, match=r"only pickled weights \['adapter_model.bin'\].*--allow-pickle"):
        build_model(
            source_model=str(demo_sources.base), adapters=[str(adapter)], model_name="merged_model", repository=served
        )
    assert unchanged(served, before)


def test_adapter_for_another_base_fails_naming_the_mismatch(
    demo_sources: DemoSources, served: Path, tmp_path: Path, work: Path
) -> None:
    before = snapshot(served)
    other = tiny_llama(tmp_path / "other-base", hidden=64)
    shutil.copy(demo_sources.base / "tokenizer.json", other)
    shutil.copy(demo_sources.base / "tokenizer_config.json", other)
    with pytest.raises(AdapterMismatch, match=r"does not fit base .*other-base \(llama\): .* is \[128, 8\], expected"):
        build_model(
            source_model=str(other),
            adapters=[str(demo_sources.sql_adapter)],
            model_name="merged_model",
            repository=served,
            work_dir=work,
        )
    assert unchanged(served, before)


def test_untrained_adapter_fails_validation_and_publishes_nothing(
    demo_sources: DemoSources, served: Path, tmp_path: Path, work: Path
) -> None:
    from prefect.client.orchestration import get_client

    before = snapshot(served)
    zero = untrained_adapter(demo_sources.sql_adapter, tmp_path / "untrained")
    with pytest.raises(ValidationFailed, match=r"adapters change the greedy completion of only 0 of 6 prompts"):
        build_model(
            source_model=str(demo_sources.base),
            adapters=[str(zero)],
            model_name="merged_model",
            repository=served,
            work_dir=work,
        )
    assert unchanged(served, before)
    # The failed run still leaves its report, for the user to see why.
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    assert any(a.key == "validation-merged-model" and "FAILED" in str(a.data) for a in artifact)


def test_a_build_that_would_not_fit_in_memory_fails_before_the_stage(
    demo_sources: DemoSources, served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Estimated from the safetensors headers, against what is free (here capped by LORA_MEMORY_LIMIT_GB)."""
    before = snapshot(served)
    monkeypatch.setenv("LORA_MEMORY_LIMIT_GB", "0.01")  # 10 MB: less than the build process already holds
    with pytest.raises(
        PipelineError,
        match=r"merging the adapters tensor by tensor needs about \d+ MB, 0 MB available "
        r"\(under LORA_MEMORY_LIMIT_GB=0\.01\)",
    ):
        build_model(
            source_model=str(demo_sources.base),
            adapters=[str(demo_sources.sql_adapter)],
            model_name="merged_model",
            repository=served,
            work_dir=tmp_path / "work",  # nothing cached: the merge is the first stage to run
        )
    assert unchanged(served, before) and not list((tmp_path / "work").glob("merged-*"))


def test_command_line_failure_is_one_line(
    demo_sources: DemoSources, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--source-model",
            str(tmp_path / "nope"),
            "--model-name",
            "merged_model",
            "--repository",
            str(tmp_path / "models"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == f"build_model failed: base {tmp_path / 'nope'}: no such folder"
    assert not (tmp_path / "models" / "index.json").exists()

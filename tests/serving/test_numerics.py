"""Each version is computed as it pins: the server applies its manifest's numerics and reports them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import modelrepo
from modelrepo.numerics import (
    DEFAULT,
    INFERENCE_PRECISIONS,
    KV_CACHE_PRECISIONS,
    KV_CACHES_FOR_COMPUTE,
    Numerics,
    capabilities,
    default_numerics,
    effective,
    engine_properties,
)
from tests.serving.conftest import Server, version_source
from tests.support import DemoRepository

pytestmark = pytest.mark.slow
# An f16 KV cache goes with bf16 compute and with the f32 a CPU without BF16 computes instead.
BF16 = Numerics(inference_precision="bf16", kv_cache_precision="f16", dynamic_quantization_group_size=0)


@pytest.fixture(scope="module")
def numerics_server(
    start_server, demo_repository: DemoRepository, tmp_path_factory: pytest.TempPathFactory
) -> Server:
    """The demo repository, plus a version pinned to bf16 and one built before versions pinned numerics."""
    repo = demo_repository.copy_to(tmp_path_factory.mktemp("numerics-repo"))
    work = tmp_path_factory.mktemp("numerics-src")
    source = version_source(repo, "merged_model", work / "merged")
    modelrepo.publish_version(repo, "bf16_model", "merged", source, {"numerics": BF16.to_json()})
    modelrepo.publish_version(repo, "legacy_model", "merged", source, {"built_by": "an older pipeline"})
    return start_server(repo)


def test_the_graph_for_ovms_carries_the_pinned_numerics(numerics_server: Server) -> None:
    graph = (numerics_server.repository / "bf16_model" / "1" / "graph.pbtxt").read_text()
    assert f"plugin_config: '{json.dumps(BF16.plugin_config())}'" in graph
    legacy = (numerics_server.repository / "legacy_model" / "1" / "graph.pbtxt").read_text()
    assert "plugin_config: '{}'" in legacy


def test_models_report_pinned_and_effective_numerics(numerics_server: Server) -> None:
    with numerics_server.client() as http:
        names = ("merged_model", "bf16_model", "legacy_model")
        cards = {m: http.get(f"/v3/models/{m}").json()["numerics"] for m in names}
        config = http.get("/v1/config").json()
    suite = default_numerics()
    assert cards["merged_model"] == {"pinned": suite.to_json(), "effective": effective(suite).to_json()}
    # A version that pins nothing is served with the default numerics, and says it pins nothing.
    assert cards["legacy_model"] == {"pinned": None, "effective": effective(default_numerics()).to_json()}
    has_bf16 = "BF16" in capabilities()
    assert cards["bf16_model"]["pinned"] == BF16.to_json()
    assert cards["bf16_model"]["effective"]["inference_precision"] == ("bf16" if has_bf16 else "f32")
    assert cards["bf16_model"]["effective"]["kv_cache_precision"] == "f16"  # honoured on every CPU
    assert config["bf16_model"]["numerics"] == cards["bf16_model"]
    if not has_bf16:  # the server says when a CPU cannot compute what a version pins
        assert "bf16_model v1 pins bf16 compute" in numerics_server.logs()
        assert "but this CPU computes f32 compute" in numerics_server.logs()


def test_a_version_is_computed_with_its_pinned_numerics(numerics_server: Server) -> None:
    """The server's greedy answer equals openvino-genai's compiled with the version's pinned properties."""
    import openvino_genai

    from demo.data import REFERENCE_PROMPT

    folder = numerics_server.repository / "bf16_model" / "1"
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.apply_chat_template = 24, False
    pipe = openvino_genai.LLMPipeline(str(folder), "CPU", engine_properties(BF16))
    expected = str(pipe.generate(REFERENCE_PROMPT, config))
    body = {"model": "bf16_model", "prompt": REFERENCE_PROMPT, "max_tokens": 24, "temperature": 0}
    with numerics_server.client() as http:
        assert http.post("/v3/completions", json=body).json()["choices"][0]["text"] == expected


def test_numerics_that_are_not_valid_are_refused_at_publish(demo_repository: DemoRepository, tmp_path: Path) -> None:
    repo = demo_repository.copy_to(tmp_path / "repo")
    source = version_source(repo, "merged_model", tmp_path / "src")
    bad = {**DEFAULT.to_json(), "inference_precision": "fp8"}
    with pytest.raises(modelrepo.RepositoryError, match=r"inference_precision must be one of .*got 'fp8'"):
        modelrepo.publish_version(repo, "odd", "merged", source, {"numerics": bad})
    assert not (repo / "odd").exists() or modelrepo.read_index(repo).entries.get("odd") is None
    no_kernel = {**DEFAULT.to_json(), "inference_precision": "bf16", "kv_cache_precision": "f32"}
    with pytest.raises(modelrepo.RepositoryError, match=r"kv_cache_precision f32 cannot go with bf16 compute"):
        modelrepo.publish_version(repo, "odd", "merged", source, {"numerics": no_kernel})
    assert modelrepo.read_index(repo).entries.get("odd") is None


def test_every_pin_a_build_accepts_runs_on_this_cpus_serving_engine(demo_repository: DemoRepository) -> None:
    """What `check` accepts, the engine compiles here (with what this CPU makes of it): a pin is never servable
    on one CPU and not on another. Caught on a BF16 CPU: bf16 compute over an f32 KV cache has no kernel."""
    import openvino_genai

    folder = demo_repository.root / "merged_model" / "1"
    accepted = [
        Numerics(compute, kv, 32)
        for compute in INFERENCE_PRECISIONS
        for kv in KV_CACHE_PRECISIONS
        if kv in KV_CACHES_FOR_COMPUTE[compute]
    ]
    assert len(accepted) == 8
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = 2
    for numerics in accepted:
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.cache_size = 1
        pipe = openvino_genai.ContinuousBatchingPipeline(
            str(folder), scheduler, "CPU", engine_properties(effective(numerics))
        )
        assert len(pipe.generate(["SELECT"], [config])[0].m_generation_ids) == 1, numerics

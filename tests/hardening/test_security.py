"""Security: the API key (accepted only whole, never logged), no pickles or remote code without their flags,
no name that leaves the repository, and size limits on request bodies and adapter files."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import httpx
import pytest

import modelrepo
import serving.auth
from demo.make_sources import DemoSources
from tasks.errors import SourceError
from tests.hardening.conftest import Server, assert_openai_error, tree_digest
from tests.serving.test_adapters import publish_adapter
from tests.support import DemoRepository

pytestmark = pytest.mark.slow

API_KEY = "hardening-9c1d5e7a3b0f4d2e8a6c"
BODY = {"model": "base_model", "prompt": "The city", "max_tokens": 2}


# ---- the API key ----


@pytest.fixture(scope="module")
def keyed_server(start_server, served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """A server with an API key, logging at debug level, so the key has every chance to leak into the log."""
    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(API_KEY + "\n")
    return start_server(served_repository, "--api-key-file", str(key_file), "--log-level", "debug")


@pytest.mark.parametrize(
    ("authorization", "accepted"),
    [
        (f"Bearer {API_KEY}", True),
        (f"bearer {API_KEY}", True),  # the scheme is case-insensitive (RFC 9110)
        (f"Bearer {API_KEY}  ", True),
        (f"Bearer {API_KEY[:-1]}", False),  # a prefix
        (f"Bearer {API_KEY}x", False),  # longer
        (f"Bearer {API_KEY[:-1]}X", False),  # same length, last character differs
        (f"Basic {API_KEY}", False),
        (API_KEY, False),
        ("", False),
        (f"Bearer {API_KEY[:-1]}\u00e9", False),  # not ASCII
    ],
)
def test_the_api_key_comparison_accepts_only_the_key(authorization: str, accepted: bool) -> None:
    # That it takes constant time (hmac.compare_digest) is not measured: on a shared 2-core machine the
    # ~1 ms an ordinary == would leak on a 16 MiB key was within the timer's noise (tried, it flipped).
    assert serving.auth.api_key_matches(authorization, API_KEY) is accepted


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer " + "x" * len(API_KEY),  # same length
        "Bearer " + API_KEY[:-1] + chr(ord(API_KEY[-1]) ^ 1),  # same length, last character off
        "Bearer " + API_KEY[:8],  # shorter
        "Bearer " + API_KEY + "0",  # longer
        "Bearer",
        "Basic " + API_KEY,  # the right key, the wrong scheme
        API_KEY,  # no scheme at all
        b"Bearer \xff\xfe" + API_KEY.encode(),  # bytes that are not UTF-8
    ],
    ids=["none", "same-length", "one-char-off", "shorter", "longer", "empty", "basic", "no-scheme", "binary"],
)
def test_a_wrong_or_missing_api_key_gets_401_in_openai_shape(keyed_server: Server, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("POST", "/v3/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        r = httpx.request(method, f"{keyed_server.url}{path}", json=BODY, headers=headers, timeout=30)
        error = assert_openai_error(r, 401, "invalid_api_key")
        assert API_KEY not in json.dumps(error)


def test_the_right_key_is_accepted_and_health_stays_open(keyed_server: Server) -> None:
    ok = httpx.post(
        f"{keyed_server.url}/v3/completions", json=BODY, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    assert ok.status_code == 200, ok.text
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert httpx.get(f"{keyed_server.url}{path}").status_code == 200


def test_the_api_key_never_appears_in_logs_metrics_or_config(keyed_server: Server) -> None:
    right = {"Authorization": f"Bearer {API_KEY}"}
    near_miss = API_KEY[:-1] + "X"
    with httpx.Client(base_url=keyed_server.url, timeout=30) as http:
        http.post("/v3/completions", json=BODY, headers=right)
        http.post("/v3/completions", json={**BODY, "stream": True}, headers=right)
        http.post("/v3/completions", json={**BODY, "max_tokens": -1}, headers=right)  # an error path
        http.post("/v3/completions", content=b"{broken", headers={**right, "content-type": "application/json"})
        http.post("/v3/completions", json=BODY, headers={"Authorization": f"Bearer {near_miss}"})
        http.get("/v1/config/", headers=right)
        exposed = {
            path: http.get(path, headers=right).text for path in ("/metrics", "/v1/config/", "/v2/health/ready")
        }
    for path, text in exposed.items():
        assert API_KEY not in text, path
    logs = keyed_server.logs()
    assert "POST /v3/completions" in logs  # the log really records requests (so the check below means something)
    assert API_KEY not in logs
    assert near_miss not in logs  # a wrong key is often a typo of the right one


# ---- pickles and remote code (pipeline side) ----


class _Trap:
    """Unpickling this runs code: it creates the file `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def _refused_build(sources: DemoSources, tmp_path: Path, **kwargs: object) -> SourceError:
    from flows.build_model import build_model

    repository = tmp_path / "models"
    arguments = {"source_model": str(sources.base), "model_name": "merged_model", "repository": repository}
    with pytest.raises(SourceError) as caught:
        build_model(**{**arguments, "work_dir": tmp_path / "work", **kwargs})
    assert not repository.exists() or not any(repository.iterdir()), "a refused build wrote to the repository"
    return caught.value


@pytest.mark.usefixtures("prefect_server")
def test_pickled_weights_are_refused_without_allow_pickle_and_never_unpickled(
    demo_sources: DemoSources, tmp_path: Path
) -> None:
    ran = tmp_path / "the-pickle-ran"
    adapter = tmp_path / "pickled-adapter"
    adapter.mkdir()
    shutil.copy(demo_sources.sql_adapter / "adapter_config.json", adapter)
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _Trap(ran)}))
    error = _refused_build(demo_sources, tmp_path, adapters=[str(adapter)])
    assert "--allow-pickle" in str(error) and "adapter_model.bin" in str(error), error
    assert not ran.exists(), "the pickle was loaded"


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("how", ["python-file", "auto_map"])
def test_remote_code_is_refused_without_trust_remote_code_and_never_imported(
    how: str, demo_sources: DemoSources, tmp_path: Path
) -> None:
    ran = tmp_path / "the-code-ran"
    base = Path(shutil.copytree(demo_sources.base, tmp_path / "base"))
    (base / "configuration_evil.py").write_text(f"from pathlib import Path\nPath({str(ran)!r}).touch()\n")
    if how == "auto_map":
        config = json.loads((base / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
        (base / "config.json").write_text(json.dumps(config))
    error = _refused_build(demo_sources, tmp_path, source_model=str(base))
    assert "--trust-remote-code" in str(error), error
    assert not ran.exists(), "the model's code was imported"


# ---- names that try to leave the repository ----

ESCAPING_NAMES = ["../outside", "..", "/tmp/outside", "a/../../outside", "sub/name", "./x", "~root", ""]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_publish_refuses_names_that_leave_the_repository(
    name: str, demo_repository: DemoRepository, tmp_path: Path
) -> None:
    repo = demo_repository.copy_to(tmp_path / "inside" / "models")
    before = tree_digest(tmp_path)
    source = repo / "base_model" / "1"
    with pytest.raises(modelrepo.RepositoryError, match="invalid model name"):
        modelrepo.publish_version(repo, name, "base", source, {})
    with pytest.raises(modelrepo.RepositoryError, match="invalid model name"):
        modelrepo.publish_version(repo, "fine_name", "adapter", source, {}, base=name, alpha=2.0)
    assert tree_digest(tmp_path) == before  # nothing written, inside or outside
    assert not Path("/tmp/outside").exists()


@pytest.mark.usefixtures("prefect_server")
def test_the_build_flow_refuses_a_model_name_that_leaves_the_repository(
    demo_sources: DemoSources, tmp_path: Path
) -> None:
    from flows.build_model import build_model

    with pytest.raises(modelrepo.RepositoryError, match="invalid model name"):
        build_model(source_model=str(demo_sources.base), model_name="../outside", repository=tmp_path / "models")
    assert list(tmp_path.iterdir()) == []


# (At load: test_faults.py::test_a_truncated_or_invalid_index_is_reported_and_the_models_keep_serving
# writes indexes naming "../outside" and an absolute path, with a valid model waiting there.)


# ---- adapter file size limit ----

ADAPTER_LIMIT = 4096  # bytes: the demo adapter's weights are larger, so it must be refused


@pytest.fixture(scope="module")
def limited_server(
    start_server, demo_repository: DemoRepository, demo_sources: DemoSources, tmp_path_factory: pytest.TempPathFactory
) -> Server:
    repo = demo_repository.copy_to(tmp_path_factory.mktemp("adapter-limit"))
    publish_adapter(repo, "sql_adapter", demo_sources.sql_adapter, tmp_path_factory.mktemp("adapter-src"))
    assert (repo / "sql_adapter" / "1" / "adapter_model.safetensors").stat().st_size > ADAPTER_LIMIT
    return start_server(repo, env={"LORA_SERVE_MAX_ADAPTER_BYTES": str(ADAPTER_LIMIT)})


def test_an_adapter_file_over_the_size_limit_is_refused_and_its_base_keeps_serving(limited_server: Server) -> None:
    ready = httpx.get(f"{limited_server.url}/v2/health/ready").json()
    assert "sql_adapter" not in ready["models"], ready
    assert "sql_adapter" in ready["failures"], ready
    assert str(ADAPTER_LIMIT) in ready["failures"]["sql_adapter"]["error"], ready
    r = httpx.post(f"{limited_server.url}/v3/completions", json={**BODY, "model": "sql_adapter"})
    assert_openai_error(r, 404, "model_not_found")
    assert httpx.post(f"{limited_server.url}/v3/completions", json=BODY, timeout=30).status_code == 200

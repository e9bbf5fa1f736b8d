"""A build on another machine: a worker with no checkout clones the code and publishes into a bucket, which a
server on a third host serves from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import modelrepo
from tests.ops.cli import ROOT, prefect_cli, run_deployment, state_and_artifacts
from tests.serving.conftest import Server
from tests.support import wait_for

pytestmark = pytest.mark.slow


def _git(args: list[str], cwd: Path) -> str:
    # An identity of its own: the machine running the tests may have none configured.
    cmd = ["git", "-c", "user.name=lora tests", "-c", "user.email=tests@localhost", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def code_repository(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The project's git repository as a worker elsewhere would clone it: the checkout's files as they are now
    (committed or not, ignored ones left out), one commit; its file:// URL."""
    repo = tmp_path_factory.mktemp("code.git")
    files = _git(["ls-files", "--cached", "--others", "--exclude-standard", "-z"], ROOT).split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():  # a file deleted but not yet committed is listed and absent
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    _git(["init", "--quiet"], repo)
    _git(["add", "--all"], repo)
    _git(["commit", "--quiet", "-m", "the code under test"], repo)
    return repo.as_uri()


def _worker_machine(root: Path, api_url: str) -> tuple[Path, dict[str, str]]:
    """An empty working folder and an environment that share nothing with the checkout: no PYTHONPATH,
    a Prefect home and a build cache of its own; the bucket's AWS_* variables as the worker's host sets them."""
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORA_WORK_DIR")}
    env |= {
        "PWD": str(root),
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(root / "prefect-home"),
        "LORA_WORK_DIR": str(root / "work"),
    }
    return root, env


def _served(server: Server) -> dict[str, int]:
    return httpx.get(f"{server.url}/v2/health/ready", timeout=10).json()["models"]


async def test_a_remote_worker_publishes_into_the_bucket_and_a_server_on_it_serves_the_version(
    deployed: tuple[Path, dict], code_repository: str, bucket: str, start_server, tmp_path: Path
) -> None:
    project, env = deployed
    # The server reads the bucket only (into a cache folder of its own); it starts before anything is published.
    server = start_server(bucket, "--cache-dir", str(tmp_path / "server-cache"))
    assert _served(server) == {}
    prefect_cli(["variable", "set", "lora_code_repository", code_repository, "--overwrite"], project, env)
    worker_dir, worker_env = _worker_machine(tmp_path / "worker", env["PREFECT_API_URL"])
    # What the worker has is what its pull step clones: the checkout's packages do not import there.
    probe = subprocess.run(
        [sys.executable, "-c", "import modelrepo"], cwd=worker_dir, env=worker_env, capture_output=True
    )
    assert probe.returncode != 0, "the worker's environment reaches the checkout: the test would prove nothing"

    run_id = run_deployment(
        project, env, "build_model/remote-base-model", pool="lora-remote-builds",
        params={"repository": bucket}, worker_cwd=worker_dir, worker_env=worker_env,
    )
    state, _ = await state_and_artifacts(run_id)
    assert state == "COMPLETED"
    # Committed in the bucket, complete and intact, by this run.
    entry = modelrepo.read_index(bucket).entries["base_model"]
    assert (entry.kind, entry.version) == ("base", 1)
    store = modelrepo.open_store(bucket)
    assert store.verify_version(entry.path) == []
    manifest = store.read_manifest(entry.path)
    assert manifest["build"]["flow_run"] == run_id and manifest["validation"]["passed"]

    # The running server picks the version up from the bucket and answers from it.
    wait_for(lambda: _served(server).get("base_model") == 1, timeout=120, what="base_model 1 on the server")
    with server.client() as http:
        r = http.post("/v3/completions", json={"model": "base_model", "prompt": "SELECT", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["system_fingerprint"] == "base_model/1", r.text

"""prefect.yaml deployed once for the ops tests: a copy of the checkout, its pools and deployments registered."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.ops.cli import ROOT, prefect_cli
from tests.serving.conftest import start_server  # noqa: F401  (servers on demand, for the ops tests too)

CODE = ["flows", "tasks", "modelrepo", "demo", "prefect.yaml"]
POOLS = ["lora-builds", "lora-remote-builds"]  # the process pools prefect.yaml's deployments name


@pytest.fixture(scope="package")
def deployed(prefect_server: None, demo_sources, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A copy of the checkout, its deployments registered on the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    project = tmp_path_factory.mktemp("project")
    for name in CODE:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, project / name)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PWD": str(project)}
    env.pop("PYTHONPATH", None)  # the worker must find the code in its working directory, as a user's would
    for pool in POOLS:
        prefect_cli(["work-pool", "create", pool, "--type", "process"], project, env)
    prefect_cli(["deploy", "--all"], project, env)
    return project, env

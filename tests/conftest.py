"""Shared fixtures: the demo sources and a small served repository, built once per run; one Prefect server."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Prefect reads its settings at import: a home of our own, no network, a patient first start on 2 cores.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from demo.make_sources import DemoSources, ensure_demo_sources
from tests.support import DemoRepository, build_demo_repository


@pytest.fixture(scope="session")
def demo_sources() -> DemoSources:
    """The tiny base model and its two adapters (cached across runs by generator version)."""
    return ensure_demo_sources()


@pytest.fixture(scope="session")
def demo_repository(demo_sources: DemoSources, tmp_path_factory: pytest.TempPathFactory) -> DemoRepository:
    """A repository serving base_model and merged_model (base + sql adapter), fp16, built once per run.

    Read-only for tests: a test that publishes must copy it (`DemoRepository.copy_to`).
    """
    return build_demo_repository(demo_sources, tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for the whole session; flow runs in tests report to it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path

"""Shared fixtures: the demo sources and a small served repository, built once per run; one Prefect server;
one flow work folder and one flow-built base (same inputs share cached steps across the flow and serving tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# Prefect reads its settings at import: a home of our own, no network, a patient first start on 2 cores.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from demo.make_sources import DemoSources, ensure_demo_sources
from tests.support import SERVER_LOGS, DemoRepository, build_demo_repository, crash_reports

if TYPE_CHECKING:  # imports Prefect: only the tests that build with a flow pay for it
    from tasks.publish import Published


_LOG_SIZES = pytest.StashKey[dict[Path, int]]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Where each server log ends before the test: a failure shows only the crashes during it."""
    item.stash[_LOG_SIZES] = {log: log.stat().st_size for log in item.config.stash.get(SERVER_LOGS, []) if log.exists()}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A failed test shows what a crashed engine process wrote in its server's log (faulthandler's stack)."""
    report = yield
    if report.failed:
        since = item.stash.get(_LOG_SIZES, {})
        for title, text in crash_reports(item.config.stash.get(SERVER_LOGS, []), since):
            report.sections.append((title, text))
    return report


def pytest_report_header(config: pytest.Config) -> str:
    """Which numerics the suite pins, and whether this CPU can compute bf16: figures differ across CPUs."""
    from modelrepo.numerics import PRECISION_ENV, capabilities, default_numerics

    return (
        f"numerics: {default_numerics()} ({PRECISION_ENV}={os.environ.get(PRECISION_ENV) or 'unset'}); "
        f"CPU OPTIMIZATION_CAPABILITIES: {' '.join(capabilities())}"
        + ("" if "BF16" in capabilities() else " (no BF16: this CPU computes f32 whatever a model asks)")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """LORA_INFERENCE_PRECISION=bf16 on a CPU without bf16 would test f32 under bf16's name: skip, and say so."""
    from modelrepo.numerics import PRECISION_ENV, capabilities, default_numerics

    wanted = default_numerics().inference_precision
    if wanted != "f32" and wanted.upper() not in capabilities():
        skip = pytest.mark.skip(
            reason=f"{PRECISION_ENV}={wanted}, but this CPU has no {wanted.upper()} "
            f"(OPTIMIZATION_CAPABILITIES {capabilities()}): it would compute f32; run it on a CPU that has it"
        )
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_sources() -> DemoSources:
    """The tiny base model and its two adapters: the pinned ones (demo/sources), or LORA_DEMO_SOURCES to try others."""
    override = os.environ.get("LORA_DEMO_SOURCES")
    return DemoSources(Path(override)) if override else ensure_demo_sources()


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


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The flows' work folder for the session: builds from the same inputs reuse its steps."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def flow_built_base(demo_sources: DemoSources, prefect_server: None, work: Path, tmp_path_factory) -> Published:
    """base_model (fp16) built by the build_model flow, so its manifest records its source. Read-only: copy it."""
    from flows.build_model import build_model

    return build_model(
        source_model=str(demo_sources.base),
        model_name="base_model",
        repository=tmp_path_factory.mktemp("flow-repo"),
        work_dir=work,
    )


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


class S3Server:
    """tests/s3server.py in a process of its own; `pause` and `resume` make it hang and answer again."""

    def __init__(self) -> None:
        root = Path(__file__).parents[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.s3server"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the S3 server did not start: {line!r}")
        self.endpoint = f"http://127.0.0.1:{int(line.split()[1])}"

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)  # connections are still accepted, never answered: a hung store

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        self.process.wait(10)

    def new_bucket(self) -> str:
        return new_bucket(self.endpoint)


def new_bucket(endpoint: str) -> str:
    """A new, empty bucket; returns the repository URL s3://BUCKET/models."""
    import boto3

    name = f"repo-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}/models"


@contextlib.contextmanager
def _aws_environment(endpoint: str) -> Iterator[None]:
    """The usual AWS_* variables naming `endpoint`: the code under test and its processes find it as a user's would."""
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV | {"AWS_ENDPOINT_URL": endpoint})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto, tests/s3server.py) on loopback, and the AWS_* environment naming it."""
    server = S3Server()
    try:
        with _aws_environment(server.endpoint):
            yield server.endpoint
    finally:
        server.stop()


@pytest.fixture
def own_s3() -> Iterator[S3Server]:
    """An S3 server of the test's own, which it may pause; the AWS_* environment names it during the test."""
    server = S3Server()
    try:
        with _aws_environment(server.endpoint):
            yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the test S3 server; returns the repository URL s3://BUCKET/models."""
    return new_bucket(s3_endpoint)

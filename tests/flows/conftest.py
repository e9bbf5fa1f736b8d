"""Flow fixtures: one work folder a session (same inputs share cached steps), and one flow-built base."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.make_sources import DemoSources
from tasks.publish import Published


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
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

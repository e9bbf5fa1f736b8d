"""Publishing: a publish killed half way leaves the index on the previous version; the next publish works."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import modelrepo
from tasks.publish import REPORT, build_key, publish_model, up_to_date
from tasks.workdir import tool_versions
from tests.support import DemoRepository

# Runs one publish in a child process that SIGKILLs itself at a given point inside modelrepo: a real
# process death (no cleanup, no finally blocks), at the moments that matter most.
KILLED_PUBLISH = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import modelrepo.publish
    from tasks.publish import publish_model

    point = sys.argv[3]
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(modelrepo.publish, point, die)
    publish_model(Path(sys.argv[1]), "merged_model", "merged", Path(sys.argv[2]), {"built_by": "killed"},
                  report_markdown="# report")
    """
)


@pytest.fixture
def repo_and_build(demo_repository: DemoRepository, tmp_path: Path) -> tuple[Path, Path]:
    repo = demo_repository.copy_to(tmp_path / "models")
    build = tmp_path / "work" / "ir"
    shutil.copytree(repo / "merged_model" / "1", build, ignore=shutil.ignore_patterns("manifest.json", "graph.pbtxt"))
    return repo, build


@pytest.mark.parametrize(
    "point",
    [
        "_fsync_tree",  # the version is copied into staging and its manifest written, not yet renamed
        "_commit",  # the version folder is renamed into place, the index not yet replaced
    ],
)
def test_publish_killed_half_way_leaves_the_index_on_the_previous_version(
    repo_and_build: tuple[Path, Path], point: str
) -> None:
    repo, build = repo_and_build
    before = {p: (repo / p).read_bytes() for p in ("index.json", "config.json")}
    child = subprocess.run(
        [sys.executable, "-c", KILLED_PUBLISH, str(repo), str(build), point],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert {p: (repo / p).read_bytes() for p in before} == before
    assert modelrepo.read_index(repo).entries["merged_model"].version == 1
    assert modelrepo.verify_version(repo / "merged_model" / "1") == []

    # The lock died with the process: the next publish goes through and becomes live.
    published = publish_model(repo, "merged_model", "merged", build, {"built_by": "tests"}, report_markdown="# ok")
    entry = modelrepo.read_index(repo).entries["merged_model"]
    assert entry.version == published.version > 1
    assert modelrepo.verify_version(published.path) == []
    assert (published.path / REPORT).read_text() == "# ok"


def test_identical_live_build_is_up_to_date(repo_and_build: tuple[Path, Path]) -> None:
    repo, build = repo_and_build
    key = build_key([{"base": "sha256:x"}], "fp16", "CPU", tool_versions())
    assert up_to_date(repo, "merged_model", key) is None  # the demo repository's build records no key
    published = publish_model(repo, "merged_model", "merged", build, {"build": {"key": key}})
    assert up_to_date(repo, "merged_model", key) == modelrepo.read_index(repo).entries["merged_model"]
    assert up_to_date(repo, "merged_model", build_key([{"base": "sha256:y"}], "fp16", "CPU", tool_versions())) is None
    assert published.version == 2

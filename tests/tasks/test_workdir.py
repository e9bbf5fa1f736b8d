"""A step's key: everything that determines its output (inputs, options, tool versions, its code), and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tasks import workdir
from tasks.export import EXPORT
from tasks.merge import MERGE
from tasks.validate import VALIDATE
from tasks.workdir import TOOLS, Step


def with_version(monkeypatch: pytest.MonkeyPatch, tool: str, version: str) -> None:
    """`tool` reported at `version`, as after an upgrade; every other tool as installed."""
    installed = workdir.installed_version
    monkeypatch.setattr(workdir, "installed_version", lambda name: version if name == tool else installed(name))


@pytest.mark.parametrize("step", [MERGE, EXPORT, VALIDATE], ids=lambda s: s.name)
def test_a_step_key_changes_with_each_tool_it_calls_and_only_those(
    step: Step, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = step.key("sha256:base", "fp16")
    for tool in TOOLS:
        with monkeypatch.context() as m:
            with_version(m, tool, "99.0+upgraded")
            assert (step.key("sha256:base", "fp16") != before) == (tool in step.tools), tool
    assert step.key("sha256:base", "int8") != before  # an option
    assert step.key("sha256:other", "fp16") != before  # an input
    assert step.key("sha256:base", "fp16") == before  # and nothing else: the same key again


def test_a_step_key_changes_with_its_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "some_step.py").write_text("def run():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    step = Step("some", tools=("peft",), modules=("some_step",))
    before = step.key("x")
    (tmp_path / "some_step.py").write_text("def run():\n    return 2\n")
    assert step.key("x") != before
    assert "some_step" not in sys.modules  # hashed, not imported


def test_a_step_calling_a_tool_no_manifest_records_is_refused() -> None:
    with pytest.raises(ValueError, match="not in TOOLS"):
        Step("some", tools=("numpy",), modules=())


def test_a_step_folder_is_named_by_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = MERGE.folder(tmp_path, "sha256:base")
    assert before.parent == tmp_path and before.name == f"merged-{MERGE.key('sha256:base')}"
    with_version(monkeypatch, "peft", "99.0+upgraded")
    assert MERGE.folder(tmp_path, "sha256:base") != before

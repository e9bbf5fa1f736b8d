"""Helpers for tests: build a small served repository from the demo sources without Prefect."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import modelrepo
from demo.make_sources import DemoSources
from tasks.export import export_openvino
from tasks.merge import merge_adapters


@dataclass(frozen=True)
class DemoRepository:
    root: Path
    sources: DemoSources

    def copy_to(self, dest: Path) -> Path:
        shutil.copytree(self.root, dest, dirs_exist_ok=True)
        return dest


def build_demo_repository(sources: DemoSources, root: Path, weight_format: str = "fp16") -> DemoRepository:
    work = Path(tempfile.mkdtemp(prefix="demo-repo-"))
    try:
        export_openvino(sources.base, work / "base_ir", weight_format)  # type: ignore[arg-type]
        modelrepo.publish_version(root, "base_model", "base", work / "base_ir", {"built_by": "tests"})
        merge_adapters(sources.base, [sources.sql_adapter], work / "merged")
        export_openvino(work / "merged", work / "merged_ir", weight_format)  # type: ignore[arg-type]
        modelrepo.publish_version(root, "merged_model", "merged", work / "merged_ir", {"built_by": "tests"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DemoRepository(root, sources)

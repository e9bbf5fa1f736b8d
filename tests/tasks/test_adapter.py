"""Staging a runtime adapter: its safetensors weights and config, pickles converted only when allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.make_sources import DemoSources
from tasks.adapter import stage_adapter
from tasks.errors import SourceError
from tests.tasks.makers import pickled_adapter


def test_staged_adapter_holds_exactly_the_served_files(demo_sources: DemoSources, tmp_path: Path) -> None:
    staged = stage_adapter(demo_sources.sql_adapter, tmp_path / "staged")
    assert sorted(p.name for p in staged.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (staged / name).read_bytes() == (demo_sources.sql_adapter / name).read_bytes()


def test_pickled_adapter_is_converted_to_safetensors_when_allowed(demo_sources: DemoSources, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    pickled = pickled_adapter(demo_sources.sql_adapter, tmp_path / "pickled")
    staged = stage_adapter(pickled, tmp_path / "staged", allow_pickle=True)
    assert not (staged / "adapter_model.bin").exists()
    converted = load_file(staged / "adapter_model.safetensors")
    original = load_file(demo_sources.sql_adapter / "adapter_model.safetensors")
    assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)


def test_pickled_adapter_is_refused_without_the_flag(demo_sources: DemoSources, tmp_path: Path) -> None:
    pickled = pickled_adapter(demo_sources.sql_adapter, tmp_path / "pickled")
    with pytest.raises(SourceError, match=r"no adapter_model\.safetensors"):
        stage_adapter(pickled, tmp_path / "staged")
    assert not (tmp_path / "staged").exists()

"""Export: a 16-bit checkpoint of another dtype is converted on disk first, and the IR is the one optimum writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from demo.make_sources import DemoSources
from tasks.export import _conversion_dtype, convert_checkpoint, export_openvino
from tests.tasks.makers import resaved


@pytest.fixture(scope="module")
def bf16_base(demo_sources: DemoSources, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo base in bf16 safetensors, sharded so that the index is converted too."""
    return resaved(demo_sources.base, tmp_path_factory.mktemp("bf16") / "base", dtype="bfloat16", max_shard_size="1MB")


def test_a_bf16_checkpoint_is_converted_for_fp16_and_fp32_only(bf16_base: Path, demo_sources: DemoSources) -> None:
    assert _conversion_dtype(bf16_base, "fp16", trust_remote_code=False) == "F16"
    assert _conversion_dtype(bf16_base, "fp32", trust_remote_code=False) == "F32"
    for fmt in ("int8", "int4"):  # loaded in the checkpoint's dtype, memory-mapped; compressed from the IR
        assert _conversion_dtype(bf16_base, fmt, trust_remote_code=False) is None
    assert _conversion_dtype(demo_sources.base, "fp16", trust_remote_code=False) is None  # f32: exported as is


def test_conversion_holds_torchs_rounding_of_every_tensor(bf16_base: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "f16"
    convert_checkpoint(bf16_base, out, "F16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in out.glob("*.safetensors"))
    total = 0
    for shard in shards:
        src, got = load_file(bf16_base / shard), load_file(out / shard)
        assert src.keys() == got.keys()
        for name, tensor in src.items():
            assert got[name].dtype == torch.float16 and torch.equal(got[name], tensor.to(torch.float16)), name
            total += got[name].numel() * 2
    assert index["metadata"]["total_size"] == total
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((bf16_base / "config.json").read_text())  # copied as is; transformers reads the files
    assert (out / "tokenizer.json").read_bytes() == (bf16_base / "tokenizer.json").read_bytes()


def test_the_converted_export_writes_the_ir_optimum_writes_from_the_bf16_checkpoint(
    bf16_base: Path, tmp_path: Path
) -> None:
    """optimum-cli's fp16 export of the bf16 checkpoint (transformers converts as it loads), byte for byte."""
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    ours = export_openvino(bf16_base, tmp_path / "ours", "fp16").folder
    main_export(
        str(bf16_base),
        output=tmp_path / "optimum",
        task="text-generation-with-past",
        ov_config=OVConfig(dtype="fp16"),
        convert_tokenizer=True,
        local_files_only=True,
    )
    theirs = tmp_path / "optimum"
    assert (ours / "openvino_model.bin").read_bytes() == (theirs / "openvino_model.bin").read_bytes()

    def graph(folder: Path) -> str:  # the xml but for names, which count the nodes made in the process
        return re.sub(r' name="[^"]*"', "", (folder / "openvino_model.xml").read_text())

    assert graph(ours) == graph(theirs)

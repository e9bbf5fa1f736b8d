"""Merge: misfits named before peft loads them; adapters apply in order, streamed from the shards as peft merges."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from demo.make_sources import DemoSources
from tasks.adapter_fit import check_adapter_fits
from tasks.errors import AdapterMismatch, SourceError
from tasks.merge import merge_adapters
from tests.tasks.makers import pickled_adapter, random_adapter, resaved, tiny_llama

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = "[user] Spell the word letter by letter.\n\n word: river [/user] [assistant]"


def peft_merged(base: Path, adapters: list[Path], tokenizer: Path | None = None) -> Any:
    """The merge as peft makes it: the base loaded in f32, each adapter merge_and_unload'ed in turn."""
    from peft import PeftModel

    from tasks.loaders import load_base, load_tokenizer

    model = load_base(base, load_tokenizer(base, tokenizer))
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload(safe_merge=True)
    return model


def tensors(folder: Path) -> dict[str, Any]:
    """Every tensor of `folder`'s model*.safetensors, as written."""
    from safetensors.torch import load_file

    found: dict[str, Any] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        found |= load_file(f)
    return found


def shard_keys(folder: Path) -> dict[str, set[str]]:
    from safetensors import safe_open

    keys = {}
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(f, framework="pt") as st:
            keys[f.name] = set(st.keys())
    return keys


def targeted(adapters: list[Path]) -> set[str]:
    """The base weights the adapters change: <module>.weight for each of their lora_A keys."""
    from safetensors import safe_open

    names: set[str] = set()
    for adapter in adapters:
        with safe_open(adapter / "adapter_model.safetensors", framework="pt") as st:
            names |= {
                k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
                for k in st.keys()  # noqa: SIM118 (safe_open is not a mapping)
                if k.endswith(".lora_A.weight")
            }
    return names


def test_fitting_adapter_reports_rank_and_scale(demo_sources: DemoSources) -> None:
    fit = check_adapter_fits(demo_sources.base, demo_sources.sql_adapter)
    assert (fit.rank, fit.lora_alpha, fit.scale) == (8, 16.0, 2.0)
    assert fit.modules == 2 * 7  # seven linears in each of two layers
    assert "q_proj" in fit.target_modules


def test_adapter_for_a_base_of_another_width_names_module_and_shapes(demo_sources: DemoSources, tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "narrow", hidden=64)
    with pytest.raises(
        AdapterMismatch,
        match=r"does not fit base .*narrow \(llama\): model\.layers\.0\.\S+\.lora_B "
        r"is \[128, 8\], expected \[64, 8\] for a base weight of \[64, \d+\]",
    ):
        check_adapter_fits(base, demo_sources.sql_adapter)


def test_adapter_for_a_base_with_fewer_layers_names_the_missing_module(
    demo_sources: DemoSources, tmp_path: Path
) -> None:
    base = tiny_llama(tmp_path / "shallow", layers=1)
    with pytest.raises(
        AdapterMismatch,
        match=r"changes model\.layers\.1\.\S+, which the base does not have "
        r"\(the base has 1 layers\)",
    ):
        check_adapter_fits(base, demo_sources.sql_adapter)


def test_adapter_for_another_architecture_names_the_modules(demo_sources: DemoSources, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=4096)).save_pretrained(base)
    # Without its recorded base (the pinned one resolves from the checkout, and is named first when found):
    # the modules are what tells.
    adapter = shutil.copytree(demo_sources.sql_adapter, tmp_path / "sql")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatch, match=r"\(gpt2\): target modules \[.*'q_proj'.*\] match no module of the base"):
        check_adapter_fits(base, adapter)


def test_adapter_whose_rank_disagrees_with_its_config_is_named(demo_sources: DemoSources, tmp_path: Path) -> None:
    adapter = shutil.copytree(demo_sources.sql_adapter, tmp_path / "sql")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 4
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatch, match=r"lora_A is \[8, (\d+)\], expected \[4, \1\] .* at rank 4"):
        check_adapter_fits(demo_sources.base, adapter)


def test_adapters_merge_in_order_into_the_sum_of_their_deltas(demo_sources: DemoSources, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.loaders import load_tokenizer
    from tasks.reference import PeftReference

    adapters = [demo_sources.sql_adapter, demo_sources.spell_adapter]
    merged = AutoModelForCausalLM.from_pretrained(merge_adapters(demo_sources.base, adapters, tmp_path / "m"))
    tok = load_tokenizer(demo_sources.base, None)
    reference = PeftReference(demo_sources.base, adapters, tok).model
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-4)
        with reference.disable_adapter():
            assert not torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-2)


def test_a_larger_tokenizer_grows_the_embeddings_with_peft(
    demo_sources: DemoSources, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    caplog.set_level(logging.INFO, logger="tasks.merge")
    rows = AutoConfig.from_pretrained(demo_sources.base).vocab_size
    tok = AutoTokenizer.from_pretrained(demo_sources.base)
    tok.add_tokens([f"<extra_{i}>" for i in range(rows - len(tok) + 10)])  # 10 more tokens than embedding rows
    tok.save_pretrained(tmp_path / "tok")
    out = merge_adapters(demo_sources.base, [demo_sources.sql_adapter], tmp_path / "m", tmp_path / "tok")
    assert AutoConfig.from_pretrained(out).vocab_size == len(tok) == rows + 10
    assert len(AutoTokenizer.from_pretrained(out)) == len(tok)
    assert f"peft merge: the tokenizer has {rows + 10} tokens and the embeddings {rows} rows" in caplog.text


@pytest.mark.parametrize("names", [["sql"], ["sql", "spell"]], ids=["one-adapter", "two-in-order"])
def test_streamed_merge_is_peft_merge_bit_for_bit_in_f32(
    demo_sources: DemoSources, tmp_path: Path, caplog: pytest.LogCaptureFixture, names: list[str]
) -> None:
    import torch

    caplog.set_level(logging.INFO, logger="tasks.merge")
    adapters = [getattr(demo_sources, f"{n}_adapter") for n in names]
    streamed = tensors(merge_adapters(demo_sources.base, adapters, tmp_path / "m"))
    assert re.search(r"streamed merge of 14 tensors in \d+\.\d s", caplog.text)
    reference = peft_merged(demo_sources.base, adapters).state_dict()
    assert streamed.keys() == reference.keys()
    assert [k for k, v in reference.items() if not torch.equal(streamed[k], v)] == []


def test_streamed_merge_keeps_untouched_tensors_and_gives_peft_logits(
    demo_sources: DemoSources, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.loaders import load_tokenizer

    adapters = [demo_sources.sql_adapter, demo_sources.spell_adapter]
    out = merge_adapters(demo_sources.base, adapters, tmp_path / "m")
    base, streamed = tensors(demo_sources.base), tensors(out)
    untouched = base.keys() - targeted(adapters)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= untouched
    assert [k for k in untouched if not torch.equal(streamed[k], base[k])] == []

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = peft_merged(demo_sources.base, adapters)
    ids = load_tokenizer(out, None)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    # the base's config, generation config, weights and tokenizer files, by name
    assert {p.name for p in out.iterdir()} == {p.name for p in demo_sources.base.iterdir()}


def test_streamed_merge_scales_and_transposes_as_peft(
    demo_sources: DemoSources, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """rsLoRA, rank_pattern, alpha_pattern, layers_to_transform, and GPT-2's Conv1D, whose weight is (in, out)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    caplog.set_level(logging.INFO, logger="tasks.merge")
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=4096)).save_pretrained(base)
    plain = random_adapter(base, tmp_path / "plain", targets=("c_attn", "c_proj"), fan_in_fan_out=True)
    patterned = random_adapter(
        base,
        tmp_path / "patterned",
        targets=("c_attn", "c_fc"),
        fan_in_fan_out=True,
        use_rslora=True,
        rank_pattern={"c_fc": 4},
        alpha_pattern={"h.1.attn.c_attn": 3},
        layers_to_transform=[1],
    )
    adapters = [plain, patterned]
    # demo_sources.base: a tokenizer of the base's 4096 tokens
    streamed = tensors(merge_adapters(base, adapters, tmp_path / "m", demo_sources.base))
    assert len(targeted(adapters)) == 7  # attn.c_attn, attn.c_proj, mlp.c_proj in both layers; mlp.c_fc in layer 1
    assert "streamed merge of 7 tensors" in caplog.text
    reference = peft_merged(base, adapters, demo_sources.base).state_dict()
    reference.pop("lm_head.weight")  # tied to transformer.wte.weight: not in the checkpoint
    assert streamed.keys() == reference.keys()
    assert [k for k, v in reference.items() if not torch.equal(streamed[k], v)] == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_sharded_base_merges_into_the_same_shards_as_peft_f32_merge_rounded(
    demo_sources: DemoSources, tmp_path: Path, dtype: str
) -> None:
    import torch

    base = resaved(demo_sources.base, tmp_path / "base", dtype=dtype, max_shard_size="200KB")
    assert len(shard_keys(base)) >= 4
    adapters = [demo_sources.sql_adapter, demo_sources.spell_adapter]
    out = merge_adapters(base, adapters, tmp_path / "m")

    assert shard_keys(out) == shard_keys(base)
    for name in ("model.safetensors.index.json", "config.json"):  # config.json keeps "dtype": the checkpoint's
        assert (out / name).read_bytes() == (base / name).read_bytes()
    original, streamed = tensors(base), tensors(out)
    reference = peft_merged(base, adapters).state_dict()  # f32, from the 16-bit weights upcast exactly
    changed = targeted(adapters)
    assert {v.dtype for v in streamed.values()} == {getattr(torch, dtype)}
    # The issue allows one 16-bit ulp from peft's f32 merge rounded; both round the same f32 sum once, so
    # they are equal, and so are the tensors no adapter changes.
    expected = {k: reference[k].to(v.dtype) if k in changed else v for k, v in original.items()}
    assert [k for k, v in expected.items() if not torch.equal(streamed[k], v)] == []
    assert sum(not torch.equal(streamed[k], original[k]) for k in changed) == len(changed) == 14


def test_dora_adapter_is_merged_by_peft_and_the_log_says_why(
    demo_sources: DemoSources, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    caplog.set_level(logging.INFO, logger="tasks.merge")
    dora = random_adapter(demo_sources.base, tmp_path / "dora", use_dora=True)
    merged = tensors(merge_adapters(demo_sources.base, [dora], tmp_path / "m"))
    assert f"peft merge: adapter {dora} sets use_dora=True, which only peft's merge applies" in caplog.text
    reference = peft_merged(demo_sources.base, [dora]).state_dict()
    assert [k for k, v in reference.items() if not torch.equal(merged[k], v)] == []


def test_pickled_adapter_is_merged_by_peft_into_what_streaming_gives(
    demo_sources: DemoSources, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    caplog.set_level(logging.INFO, logger="tasks.merge")
    pickled = pickled_adapter(demo_sources.sql_adapter, tmp_path / "pickled")
    by_peft = tensors(merge_adapters(demo_sources.base, [pickled], tmp_path / "peft", allow_pickle=True))
    assert f"peft merge: adapter {pickled} has no adapter_model.safetensors: its weights are pickled" in caplog.text
    streamed = tensors(merge_adapters(demo_sources.base, [demo_sources.sql_adapter], tmp_path / "streamed"))
    assert by_peft.keys() == streamed.keys()
    assert [k for k, v in streamed.items() if not torch.equal(by_peft[k], v)] == []


def test_adapter_that_breaks_the_merge_is_named_with_the_module(demo_sources: DemoSources, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(demo_sources.sql_adapter, tmp_path / "broken")
    weights = load_file(broken / "adapter_model.safetensors")
    weights["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][3, 0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(
        SourceError, match=rf"adapter {re.escape(str(broken))} makes model\.layers\.1\.mlp\.up_proj\.weight non-finite"
    ):
        merge_adapters(demo_sources.base, [broken], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merge_beyond_float16_range_is_named_with_the_module(demo_sources: DemoSources, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base = resaved(demo_sources.base, tmp_path / "base", dtype="float16", max_shard_size="1MB")
    big = shutil.copytree(demo_sources.sql_adapter, tmp_path / "big")
    weights = load_file(big / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    weights[key] = weights[key] * 0 + 1e6  # finite in f32, far beyond float16's 65504
    save_file(weights, big / "adapter_model.safetensors")
    with pytest.raises(
        SourceError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight merged .* exceeds torch\.float16"
    ):
        merge_adapters(base, [big], tmp_path / "m")
    assert not (tmp_path / "m").exists()


# Run in a child so the peak is the merge's alone: warm up (imports, code paths) on the tiny demo model, reset
# the kernel's peak-RSS mark (VmHWM; ru_maxrss cannot be reset, and a child's starts at pytest's RSS at fork),
# then read VmRSS before and VmHWM after merging the big one (KiB).
_MEASURE = """
import json, re, sys
from pathlib import Path
from tasks.merge import merge_adapters
def status(field):
    return int(re.search(rf"{field}:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
base, adapter, tokenizer, warm_base, warm_adapter, out = map(Path, sys.argv[1:])
merge_adapters(warm_base, [warm_adapter], out.with_name("warm"))
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
merge_adapters(base, [adapter], out, tokenizer)
print(json.dumps({"rss_before_kib": before, "peak_after_kib": status("VmHWM")}))
"""


@pytest.mark.slow
def test_streamed_merge_of_a_sharded_model_never_holds_it_whole(demo_sources: DemoSources, tmp_path: Path) -> None:
    import torch

    # ~110 M parameters: 205 MB in bf16, in 5 shards of at most 50 MB; 410 MB in f32. Measured so, the streamed
    # merge grows the peak by 55-90 MB (one weight's copies), peft's path by ~620 MB (the f32 model and more).
    base = tiny_llama(
        tmp_path / "big", hidden=1024, layers=6, vocab=16000, intermediate=2816, dtype="bfloat16", max_shard_size="50MB"
    )
    assert len(shard_keys(base)) >= 4
    on_disk = sum(f.stat().st_size for f in base.glob("model*.safetensors"))
    adapter = random_adapter(base, tmp_path / "adapter", targets=ALL_LINEAR)
    out = tmp_path / "merged"
    args = [base, adapter, demo_sources.base, demo_sources.base, demo_sources.sql_adapter, out]
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    growth = (rss["peak_after_kib"] - rss["rss_before_kib"]) * 1024
    f32_size = on_disk * 2
    figures = (
        f"peak RSS growth {growth / 1e6:.0f} MB, the model {on_disk / 1e6:.0f} MB in bf16, {f32_size / 1e6:.0f} in f32"
    )
    print(figures, rss)
    assert growth < f32_size / 2, f"{figures} ({rss})"
    assert shard_keys(out) == shard_keys(base)
    assert {v.dtype for v in tensors(out).values()} == {torch.bfloat16}

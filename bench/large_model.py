"""A random-weight Llama model of a real model's shapes, plus an r8 q/v LoRA adapter, for memory figures.

    python -m bench.large_model OUT --shape 7b      # Llama-2-7B's shapes, fp16, ~13 GB in 2 GB shards
    python -m bench.large_model OUT --shape 1.7b    # SmolLM2-1.7B's shapes, bf16, ~3.3 GB
    python -m bench.large_model OUT --shape tiny    # hidden 64, 2 layers, f32 (for tests of this script)

Writes OUT/base (config.json, generation_config.json, the tokenizer of --tokenizer (TOKENIZER_SOURCE),
model-0000X-of-0000N.safetensors shards and model.safetensors.index.json) and OUT/adapter (a PEFT
LoRA folder on q_proj and v_proj). Tensors are generated one at a time from a seeded generator and
written shard by shard, so it needs about one shard of memory. Every file is written under a
temporary name and renamed, and the index and adapter last: a run that finds them skips the work.
The vocabulary and special token ids are the tokenizer folder's (4096 for TOKENIZER_SOURCE), not the real models'.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_SOURCE = Path(__file__).resolve().parents[1] / "demo" / "sources" / "base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SHARD_BYTES = 2 * 10**9
SEED = 0
# How the weights are drawn, recorded in the index (a cached model drawn otherwise is written again):
# N(0, 0.02) as transformers initialises Llama, except the projections that write into the residual
# stream (o_proj, down_proj), at 0.02 * residual_scale / (2 * layers). Drawn all at 0.02, each random
# layer's output dwarfs the stream it adds to, 24-32 of them amplify rounding, and the logits are
# near-flat over the vocabulary: a faithful int8 export of the 1.7b shape agreed with its reference
# on 0.932 of tokens (0.964 with GPT-2's 1 / sqrt(2 * layers)), and the gate, calibrated on trained
# models (0.983 and up), refused it. At 1 / (2 * layers): 0.984, the adapter still changing 5 of the
# 6 prompts. The 7b shape (32 layers of 4096) amplifies more: 0.844 through the flow at that scale.
# Simulated in torch (NNCF's per-channel asymmetric int8 applied to every decoder weight, against
# the same weights in f32, on the 6 default prompts' tokens): residual_scale 1 / 0.3 / 0.1 gave
# agreement 0.906 / 0.969 / 1.000 (the simulation read 0.906 where the flow's engine read 0.903 on the
# same tokens). So 7b draws them at 0.1, and its adapter's B at 0.01 / residual_scale: the adapter
# writes into the stream through o_proj too, and keeps the effect it had (simulated: it flips 41%
# of positions beyond the gate's tau at scale 1, 39% at 0.1 with B x10, none at 0.1 with B as
# before). The gate's verdict on a random model says nothing of a trained one; the memory and
# time are the point.
INIT = "residual-projections-0.02/(2L)"
RESIDUAL_PROJECTIONS = ("o_proj.weight", "down_proj.weight")
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q_proj", "v_proj")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    dtype: torch.dtype
    vocab: int = 4096
    residual_scale: float = 1.0  # o_proj and down_proj drawn at 0.02 * residual_scale / (2 * layers)

    @property
    def init(self) -> str:
        """How its weights are drawn (INIT, the scale and the adapter's B when not 1)."""
        k = self.residual_scale
        return INIT if k == 1 else f"{INIT}*{k:g}, lora_B-0.01/{k:g}"


SHAPES = {
    "7b": Shape(4096, 32, 11008, 32, 32, torch.float16, residual_scale=0.1),
    "1.7b": Shape(2048, 24, 8192, 32, 32, torch.bfloat16),
    "tiny": Shape(64, 2, 176, 4, 4, torch.float32),
}


def tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of LlamaForCausalLM (untied lm_head), in the order they are written."""
    head_dim = s.hidden // s.heads
    out = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "self_attn.q_proj.weight", (s.heads * head_dim, s.hidden)),
            (p + "self_attn.k_proj.weight", (s.kv_heads * head_dim, s.hidden)),
            (p + "self_attn.v_proj.weight", (s.kv_heads * head_dim, s.hidden)),
            (p + "self_attn.o_proj.weight", (s.hidden, s.heads * head_dim)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
            (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
        ]
    return [*out, ("model.norm.weight", (s.hidden,)), ("lm_head.weight", (s.vocab, s.hidden))]


def shard_plan(s: Shape) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors split, in order, into shards of at most SHARD_BYTES (or one tensor if larger)."""
    item = torch.empty((), dtype=s.dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(s):
        n = item * torch.Size(shape).numel()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype)


def _std(name: str, s: Shape) -> float:
    return 0.02 * s.residual_scale / (2 * s.layers) if name.endswith(RESIDUAL_PROJECTIONS) else 0.02


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def vocab_size(tokenizer: Path) -> int:
    """The embedding rows for `tokenizer`: its folder's config.json vocab_size, at least the tokenizer's size."""
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if (tokenizer / "config.json").is_file():
        size = max(size, json.loads((tokenizer / "config.json").read_text()).get("vocab_size", 0))
    return size


def _special_ids(tokenizer: Path) -> dict[str, int]:
    """bos/eos/pad ids from the tokenizer folder's config.json when it has one, else 0, 1, 2."""
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if (tokenizer / "config.json").is_file():
        config = json.loads((tokenizer / "config.json").read_text())
        ids.update({k: config[k] for k in ids if isinstance(config.get(k), int)})
    return ids


def _write_config(base: Path, s: Shape, ids: dict[str, int]) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, architectures=["LlamaForCausalLM"], **ids,
    )
    config.dtype = s.dtype
    config.save_pretrained(base)


def write_base(base: Path, s: Shape, shape_name: str, tokenizer: Path) -> int:
    """The base model folder; returns its parameter count."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "model.safetensors.index.json").unlink(missing_ok=True)  # incomplete until written again
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, base / name)
    ids = _special_ids(tokenizer)
    _write_config(base, s, ids)
    _write_json(base / "generation_config.json", ids)
    g = torch.Generator().manual_seed(SEED)
    plan = shard_plan(s)
    weight_map: dict[str, str] = {}
    total = params = 0
    for k, shard in enumerate(plan, 1):
        file = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            norm = name.endswith("norm.weight")
            tensors[name] = torch.ones(shape, dtype=s.dtype) if norm else _random(shape, s.dtype, g, _std(name, s))
            weight_map[name] = file
            params += tensors[name].numel()
            total += tensors[name].numel() * tensors[name].element_size()
        tmp = base / (file + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(base / file)
        del tensors
        print(f"  {file}: {len(shard)} tensors", flush=True)
    metadata = {"total_size": total, "shape": shape_name, "seed": SEED, "init": s.init}
    index = {"metadata": metadata, "weight_map": weight_map}
    _write_json(base / "model.safetensors.index.json", index)  # last: its presence means the base is whole
    return params


def write_adapter(adapter: Path, base: Path, s: Shape) -> None:
    """An r8 LoRA on q_proj and v_proj with non-zero A and B (B small), as PEFT saves one."""
    adapter.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(SEED + 1)
    head_dim = s.hidden // s.heads
    out_features = {"q_proj": s.heads * head_dim, "v_proj": s.kv_heads * head_dim}
    tensors = {}
    for i in range(s.layers):
        for target in LORA_TARGETS:
            p = f"base_model.model.model.layers.{i}.self_attn.{target}."
            tensors[p + "lora_A.weight"] = _random((LORA_R, s.hidden), s.dtype, g, std=s.hidden**-0.5)
            tensors[p + "lora_B.weight"] = _random(
                (out_features[target], LORA_R), s.dtype, g, std=0.01 / s.residual_scale
            )
    _write_json(adapter / "adapter_config.json", {
        "base_model_name_or_path": str(base.resolve()), "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "target_modules": list(LORA_TARGETS),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    })
    tmp = adapter / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(adapter / "adapter_model.safetensors")  # last: its presence means the adapter is whole


def base_complete(base: Path, shape_name: str, s: Shape) -> bool:
    index_file = base / "model.safetensors.index.json"
    if not index_file.is_file() or not (base / "config.json").is_file():
        return False
    index = json.loads(index_file.read_text())
    return (
        index["metadata"].get("shape") == shape_name
        and index["metadata"].get("init") == s.init
        and json.loads((base / "config.json").read_text())["vocab_size"] == s.vocab
        and all((base / f).is_file() for f in set(index["weight_map"].values()))
    )


def make_large_model(out: Path, shape_name: str, tokenizer: Path = TOKENIZER_SOURCE) -> tuple[Path, Path]:
    """OUT/base and OUT/adapter of `shape_name` with `tokenizer`'s vocabulary, written unless already complete."""
    s = replace(SHAPES[shape_name], vocab=vocab_size(tokenizer))
    base, adapter = out / "base", out / "adapter"
    t = time.monotonic()
    fresh_base = not base_complete(base, shape_name, s)
    if not fresh_base:
        print(f"{base}: complete, skipped")
    else:
        params = write_base(base, s, shape_name, tokenizer)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"{base}: {params / 1e6:.1f} M parameters, {size / 1e9:.2f} GB {s.dtype} in {time.monotonic() - t:.0f} s")
    t = time.monotonic()
    adapter_files = (adapter / "adapter_model.safetensors", adapter / "adapter_config.json")
    if not fresh_base and all(f.is_file() for f in adapter_files):
        print(f"{adapter}: complete, skipped")
    else:
        write_adapter(adapter, base, s)
        print(f"{adapter}: r{LORA_R} on {', '.join(LORA_TARGETS)} in {time.monotonic() - t:.1f} s")
    return base, adapter


def check_loads(base: Path, adapter: Path) -> None:
    """transformers loads the base with every weight present; PEFT applies the adapter and changes the output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, output_loading_info=True)
    missing = [k for k, v in info.items() if v]
    if missing:
        raise RuntimeError(f"loading {base}: {info}")
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
        peft = PeftModel.from_pretrained(model, adapter)
        after = peft(ids).logits
    if torch.equal(before, after):
        raise RuntimeError(f"{adapter} does not change the output of {base}")
    change = (after - before).abs().max().item()
    print(f"checked: transformers loads {base}, PEFT applies {adapter} (max logit change {change:.2e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER_SOURCE, help="a folder with tokenizer.json")
    parser.add_argument("--check", action="store_true", help="load the base with transformers, the adapter with PEFT")
    args = parser.parse_args()
    if args.check and args.shape == "7b":
        parser.error("--check loads the model in f32: 26 GB for 7b")
    base, adapter = make_large_model(args.out, args.shape, args.tokenizer)
    if args.check:
        check_loads(base, adapter)


if __name__ == "__main__":
    main()

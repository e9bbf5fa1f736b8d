"""Sources made on the spot for tests: a pickle-only adapter, bases of other shapes or dtypes, random adapters."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def pickled_adapter(src: Path, dest: Path) -> Path:
    """The adapter saved in PEFT's old pickle format (adapter_model.bin) only."""
    import torch
    from safetensors.torch import load_file

    dest.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", dest)
    torch.save(load_file(src / "adapter_model.safetensors"), dest / "adapter_model.bin")
    return dest


def tiny_llama(
    dest: Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    vocab: int = 4096,
    intermediate: int = 352,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    max_shard_size: str | None = None,
) -> Path:
    """A random Llama base of another shape (seconds to make: nothing is trained), saved in `dtype`, maybe sharded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dest, safe_serialization=True, **shards)
    return dest


def resaved(src: Path, dest: Path, *, dtype: str, max_shard_size: str) -> Path:
    """The model folder `src` and its tokenizer saved again in `dtype`, in shards of at most `max_shard_size`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    model.save_pretrained(dest, safe_serialization=True, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def random_adapter(
    base: Path, dest: Path, *, targets: tuple[str, ...] = ("q_proj", "v_proj"), r: int = 8, **lora: Any
) -> Path:
    """A peft LoRA adapter of `base` with random A and B, so it changes the model; `lora`: more config (use_dora)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **lora)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(dest)
    return dest


def untrained_adapter(src: Path, dest: Path) -> Path:
    """A copy of the adapter with lora_B zeroed, as peft initialises it: it changes nothing."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(dest / "adapter_model.safetensors")
    save_file({k: v * 0 if ".lora_B." in k else v for k, v in weights.items()}, dest / "adapter_model.safetensors")
    return dest

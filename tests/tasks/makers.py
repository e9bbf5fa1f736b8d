"""Sources made on the spot for tests: a pickle-only adapter, a base of another shape, an untrained adapter."""

from __future__ import annotations

import shutil
from pathlib import Path


def pickled_adapter(src: Path, dest: Path) -> Path:
    """The adapter saved in PEFT's old pickle format (adapter_model.bin) only."""
    import torch
    from safetensors.torch import load_file

    dest.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", dest)
    torch.save(load_file(src / "adapter_model.safetensors"), dest / "adapter_model.bin")
    return dest


def tiny_llama(dest: Path, *, hidden: int = 128, layers: int = 2) -> Path:
    """A random Llama base of another shape (seconds to make: nothing is trained)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=352,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    return dest


def untrained_adapter(src: Path, dest: Path) -> Path:
    """A copy of the adapter with lora_B zeroed, as peft initialises it: it changes nothing."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(dest / "adapter_model.safetensors")
    save_file({k: v * 0 if ".lora_B." in k else v for k, v in weights.items()}, dest / "adapter_model.safetensors")
    return dest

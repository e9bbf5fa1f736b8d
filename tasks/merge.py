"""Merge LoRA adapters into their base model with peft, in order, and save a safetensors HF folder."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task

log = logging.getLogger(__name__)


def merge_adapters(base_dir: Path, adapter_dirs: list[Path], out_dir: Path) -> Path:
    """Apply each adapter in turn (merge_and_unload) and save the merged model with the base's tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for adapter in adapter_dirs:
        log.info("merging %s", adapter)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


merge = task(name="merge")(merge_adapters)

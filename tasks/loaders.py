"""Loading the base model and its tokenizer with transformers (torch, float32): the merge's and the reference's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_tokenizer(base_dir: Path, tokenizer_dir: Path | None, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir or base_dir, trust_remote_code=trust_remote_code)


def load_base(
    base_dir: Path, tokenizer: Any, *, trust_remote_code: bool = False, progress: Callable[[str], None] | None = None
) -> Any:
    """The base model in float32, its embeddings grown when the tokenizer has a larger vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        if progress:
            progress(f"resizing the embeddings from {rows} to {len(tokenizer)} rows for the tokenizer")
        model.resize_token_embeddings(len(tokenizer))
    return model.eval()

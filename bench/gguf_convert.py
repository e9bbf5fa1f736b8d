"""Run one of llama.cpp's converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) on the benchmark's model.

    python bench/gguf_convert.py SRC/convert_hf_to_gguf.py MODEL_DIR --outtype f16 --outfile OUT.gguf

Run as a script, with SRC, SRC/gguf-py and the peer's extra packages on PYTHONPATH (bench/peers.py does).
Two of the converter's guesses are wrong for the benchmark's tokenizer (bench/model.py), so they are
corrected here rather than in the vendored source:
- It names a BPE tokenizer's pre-tokenizer by hashing how it splits a test string, and refuses a
  hash it does not know; ours splits with GPT-2's ByteLevel regex: "gpt-2".
- It turns BOS off for every 49152-token vocabulary (a rule for IBM's Granite models); ours, the
  size of SmolLM2's, adds BOS: the GGUF says what the tokenizer does.
bench/peers.py checks the result: both servers count the same prompt tokens.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

from conversion.base import TextModel  # type: ignore[import-not-found]
from conversion.llama import LlamaModel  # type: ignore[import-not-found]

_set_vocab = LlamaModel.set_vocab


def _gpt2_pre_tokenizer(self: Any, tokenizer: Any) -> str:
    return "gpt-2"


def _set_vocab_with_bos(self: Any) -> None:
    from transformers import AutoTokenizer

    _set_vocab(self)
    tokenizer = AutoTokenizer.from_pretrained(self.dir_model)
    ids = tokenizer("a").input_ids
    self.gguf_writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)


if __name__ == "__main__":
    TextModel.get_vocab_base_pre = _gpt2_pre_tokenizer
    LlamaModel.set_vocab = _set_vocab_with_bos
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")

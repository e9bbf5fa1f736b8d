"""Fresh prompts of a fixed token length, never seen before in this run or any other (no prefix-cache hits)."""

from __future__ import annotations

import random
import time
from pathlib import Path

from bench.model import stdlib_sources


class PromptFactory:
    """Prompts cut from random standard-library files, each opening with a unique nonce line.

    Every prompt differs from its first tokens on, so no KV block can be shared with an earlier one:
    a benchmark that reuses prompts measures openvino-genai's prefix cache, not the model.
    """

    def __init__(self, tokenizer_json: Path, tokens: int, seed: int | None = None) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.tokens = tokens
        self.seed = time.time_ns() if seed is None else seed
        self.rng = random.Random(self.seed)
        self.files = stdlib_sources()
        self.count = 0

    def _snippet(self) -> str:
        while True:
            try:
                text = self.rng.choice(self.files).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if len(text) > 2000:
                start = self.rng.randrange(0, len(text) - 2000)
                return text[start : start + 2000]

    def make(self) -> str:
        """One prompt of `tokens` tokens (without BOS) in this model's tokenizer."""
        self.count += 1
        head = f"# request {self.seed % 10**9}-{self.count}\n"
        ids = self.tokenizer.encode(head + self._snippet(), add_special_tokens=False).ids[: self.tokens]
        return self.tokenizer.decode(ids)

    def batch(self, n: int) -> list[str]:
        return [self.make() for _ in range(n)]

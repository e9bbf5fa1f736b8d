"""A fast fake engine for tests of the HTTP layer, and a repository with one tiny version it can "serve"."""

from __future__ import annotations

import json
from pathlib import Path

import modelrepo
from modelrepo.numerics import DEFAULT
from serving.engine import Request
from serving.engine_core import Delta, EngineSettings, Failed, Finished
from serving.modelinfo import ModelInfo


class _Ids:
    def __init__(self, ids: list[int]) -> None:
        self.data = [ids]


class _Encoded:
    def __init__(self, ids: list[int]) -> None:
        self.input_ids = _Ids(ids)


class FakeTokenizer:
    """One token per word."""

    def encode(self, text: str, add_special_tokens: bool = True) -> _Encoded:
        return _Encoded([0] * add_special_tokens + [len(w) for w in text.split()])

    def apply_chat_template(self, history: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return " ".join(m["content"] for m in history)


class FakeEngine:
    """Answers "ok ok" at once; a prompt holding "explode" fails after its first token."""

    def __init__(self, name: str, version: int, folder: Path, adapters: list, settings: EngineSettings) -> None:
        self.name, self.version, self.adapters = name, version, {a.name: a for a in adapters}
        self.folder = folder
        self.info = ModelInfo(folder=folder, context_length=64, numerics=DEFAULT)
        self.effective = DEFAULT
        self.tokenizer = FakeTokenizer()
        self.pending = self.running = self.cancelled = self.switches = 0
        self.released = self.dead = self.yielded = False

    def submit(self, r: Request) -> None:
        events = [Delta("ok", []), Failed("the device was lost")] if 7 in r.prompt_ids else [  # len("explode")
            Delta("ok", []), Delta(" ok", []), Finished("stop", len(r.prompt_ids), 2)
        ]
        for e in events:
            r.loop.call_soon_threadsafe(r.events.put_nowait, (r.index, e))

    def cancel(self, r: Request) -> None:
        self.cancelled += 1

    def when_dead(self, callback: object) -> None:
        pass  # a fake engine has no process to die

    def can_take(self, adapters: list) -> str | None:
        return "a fake engine is built again for every adapter set"

    def retire(self) -> None:
        self.released = True

    def yield_cpu(self, yielding: bool = True) -> None:
        pass

    def close(self) -> None:
        self.released = True


def fake_repository(root: Path) -> Path:
    """A repository serving `fake` (base, version 1): the files a version needs, no weights (FakeEngine loads none)."""
    src = root / "src"
    src.mkdir()
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "max_new_tokens": 8}))
    (src / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    repo = root / "repo"
    modelrepo.publish_version(repo, "fake", "base", src, {"built_by": "tests"})
    return repo

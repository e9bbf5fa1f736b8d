"""Create the demo's sources: a tiny Llama base model, its trained tokenizer, two real LoRA adapters.

    python -m demo.make_sources --out demo-sources

Writes OUT/base (a HF model folder, safetensors), OUT/adapters/sql and OUT/adapters/spell (PEFT
folders, safetensors), and OUT/prompts/{sql,spell}.jsonl (validation prompt sets). About 90 s on
2 cores. `ensure_demo_sources()` builds them once per generator version and caches them.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from demo import data

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[system] {{ message['content'] }} [/system] "
    "{% elif message['role'] == 'user' %}[user] {{ message['content'] }} [/user]"
    "{% elif message['role'] == 'assistant' %} [assistant] {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} [assistant]{% endif %}"
)
VOCAB = 4096
SEQ = 128  # tokens per training row
SEED = 1234


@dataclass(frozen=True)
class DemoSources:
    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def sql_adapter(self) -> Path:
        return self.root / "adapters" / "sql"

    @property
    def spell_adapter(self) -> Path:
        return self.root / "adapters" / "spell"

    @property
    def sql_prompts(self) -> Path:
        return self.root / "prompts" / "sql.jsonl"

    @property
    def spell_prompts(self) -> Path:
        return self.root / "prompts" / "spell.jsonl"


def _log(msg: str) -> None:
    print(f"[demo sources] {msg}", flush=True)


def train_tokenizer(texts: list[str], out: Path):
    """A byte-level BPE of VOCAB tokens with <s>, </s>, <pad>, BOS prepended, and our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    hf.save_pretrained(out)
    return hf


def _rows(tokenizer, texts: list[str]):
    """Pack BOS+text+EOS sequences into (N, SEQ) rows of ids."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // SEQ
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ)


def pretrain_base(tokenizer, texts: list[str], out: Path, steps: int = 300) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    rows = _rows(tokenizer, texts)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(SEED)
    model.train()
    t0 = time.monotonic()
    for step in range(steps):
        batch = rows[torch.randint(len(rows), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            _log(f"base step {step + 1}/{steps} loss {loss.item():.3f} ({time.monotonic() - t0:.0f} s)")
    model.eval()
    model.generation_config.max_new_tokens = 64
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def train_adapter(base_dir: Path, tokenizer, examples: list[data.Example], out: Path, steps: int = 200) -> None:
    """A LoRA (r=8, alpha=16, all seven Llama linears) trained on the completion tokens only."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    pairs = []
    for ex in examples:
        p = tokenizer(ex.prompt)["input_ids"]
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pairs.append((torch.tensor(p + c), torch.tensor([-100] * len(p) + c)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(pairs), (8,), generator=g).tolist()
        width = max(len(pairs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id)
        labels = torch.full((len(idx), width), -100)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(pairs[i][0])
            ids[row, :n], labels[row, :n], mask[row, :n] = pairs[i][0], pairs[i][1], 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            _log(f"adapter {out.name} step {step + 1}/{steps} loss {loss.item():.3f}")
    model.save_pretrained(out, safe_serialization=True)


def write_prompts(path: Path, examples: list[data.Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "reference": ex.completion}) + "\n")


def make_demo_sources(out: Path) -> DemoSources:
    """Build every demo source into `out` (which must not exist yet)."""
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rng = random.Random(SEED)
    src = DemoSources(out)
    out.mkdir(parents=True)
    texts = data.pretraining_texts(rng, 4000)
    sql = data.sql_set(rng, 64)
    spell = data.spell_set(rng, 48)
    _log("training the tokenizer")
    tokenizer = train_tokenizer(texts + [e.prompt + e.completion for e in sql + spell], src.base)
    _log("pre-training the base model")
    pretrain_base(tokenizer, texts, src.base)
    train_adapter(src.base, tokenizer, sql, src.sql_adapter)
    tokenizer.save_pretrained(src.sql_adapter)  # the adapter ships its tokenizer, as yard1's does
    train_adapter(src.base, tokenizer, spell, src.spell_adapter)
    # Validation sets: the reference prompt plus training prompts (the adapters are memorisers).
    write_prompts(src.sql_prompts, sql[:6])
    write_prompts(src.spell_prompts, spell[:6])
    return src


def _generator_key() -> str:
    """A hash of the generator's code (its syntax tree, so comments and layout do not rebuild)."""
    h = hashlib.sha256()
    for name in ("make_sources.py", "data.py"):
        tree = ast.parse((Path(__file__).parent / name).read_text(encoding="utf-8"))
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:16]


def default_cache() -> Path:
    return Path(os.environ.get("LORA_DEMO_CACHE", Path.home() / ".cache" / "lora-pipeline" / "demo-sources"))


def ensure_demo_sources(cache: Path | None = None) -> DemoSources:
    """The demo sources for this generator version, built once and reused (safe across processes)."""
    cache = cache or default_cache()
    final = cache / _generator_key()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not (final / "complete").exists():
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".build-"))
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(final)
            try:
                make_demo_sources(tmp / "src")
                (tmp / "src" / "complete").touch()
                os.rename(tmp / "src", final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return DemoSources(final)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.make_sources", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="copy the sources here (default: print the cache folder)")
    args = parser.parse_args(argv)
    src = ensure_demo_sources()
    if args.out:
        shutil.copytree(src.root, args.out, dirs_exist_ok=True)
        _log(f"wrote {args.out}")
    else:
        _log(f"sources in {src.root}")


if __name__ == "__main__":
    main()

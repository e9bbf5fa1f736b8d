"""A model of realistic shape made here: SmolLM2-135M's configuration, a BPE trained on the stdlib, 4 LoRA adapters.

    python -m bench.model          # build (or find) the cached sources and print where they are

The weights are random: benchmarks measure speed, not quality, and a random model of the right
shape costs exactly what the trained one does per token. The adapters' lora_B is random and
non-zero (peft starts it at zero, which would change nothing), so merged and runtime-adapter
outputs really differ from the base's. Built once per version of this file, about 40 s on 2 cores,
in ~/.cache/lora-pipeline/bench-sources/<key> (LORA_BENCH_CACHE overrides), like the demo sources.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# SmolLM2-135M's config.json, the fields that set the cost per token.
SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
ADAPTERS = 4
LORA_R = 8
LORA_ALPHA = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# lora_B ~ N(0, LORA_B_STD): large enough that greedy outputs differ from the base's within a few tokens.
LORA_B_STD = 0.05
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[user] {{ message['content'] }} [/user]"
    "{% elif message['role'] == 'assistant' %} [assistant] {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} [assistant]{% endif %}"
)
SEED = 4321


@dataclass(frozen=True)
class BenchSources:
    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def adapters(self) -> list[Path]:
        return [self.root / "adapters" / f"a{i}" for i in range(ADAPTERS)]

    @property
    def key(self) -> str:
        return self.root.name


def _log(msg: str) -> None:
    print(f"[bench model] {msg}", file=sys.stderr, flush=True)


def stdlib_sources() -> list[Path]:
    """The standard library's .py files (not site-packages), in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def stdlib_texts() -> list[str]:
    texts = []
    for p in stdlib_sources():
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
    return texts


def train_tokenizer(out: Path):
    """A byte-level BPE of the full 49152-token vocabulary, BOS prepended, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SHAPE["vocab_size"],
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    hf.save_pretrained(out)
    return hf


def make_base(tokenizer, out: Path) -> None:
    """Random weights in SmolLM2-135M's shape, saved as safetensors (fp32, 0.54 GB)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        **SHAPE,
        hidden_act="silu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.max_new_tokens = 128
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def make_adapter(base_dir: Path, out: Path, seed: int) -> None:
    """A PEFT LoRA (r=8, alpha=16, all seven Llama linears) with random non-zero lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, LORA_B_STD)
    model.save_pretrained(out, safe_serialization=True)
    # peft records the scratch path the base was built in, which is gone once the cache entry is renamed.
    config_path = out / "adapter_config.json"
    body = json.loads(config_path.read_text(encoding="utf-8"))
    body["base_model_name_or_path"] = "bench-smollm2-135m-shape"
    config_path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def make_bench_sources(out: Path) -> BenchSources:
    src = BenchSources(out)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    _log("training the tokenizer on the standard library's sources")
    tokenizer = train_tokenizer(src.base)
    _log(f"tokenizer: {len(tokenizer)} tokens ({time.monotonic() - t0:.0f} s); making the base model")
    make_base(tokenizer, src.base)
    for i, adapter in enumerate(src.adapters):
        make_adapter(src.base, adapter, SEED + 1 + i)
    _log(f"base and {len(src.adapters)} adapters in {out} ({time.monotonic() - t0:.0f} s)")
    return src


def generator_key() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def default_cache() -> Path:
    return Path(os.environ.get("LORA_BENCH_CACHE", Path.home() / ".cache" / "lora-pipeline" / "bench-sources"))


@contextlib.contextmanager
def cache_lock(cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def build_once(final: Path, make) -> Path:
    """`make(tmp)` into a scratch folder renamed to `final` when complete; reused when `final` is complete."""
    with cache_lock(final.parent):
        if not (final / "complete").exists():
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".build-"))
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(final)
            try:
                make(tmp / "out")
                (tmp / "out" / "complete").touch()
                os.rename(tmp / "out", final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_bench_sources(cache: Path | None = None) -> BenchSources:
    """The benchmark's base model and adapters for this generator version, built once and reused."""
    cache = cache or default_cache()
    return BenchSources(build_once(cache / generator_key(), make_bench_sources))


if __name__ == "__main__":
    print(ensure_bench_sources().root)

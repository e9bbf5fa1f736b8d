"""The gate's reference: the base and its LoRA adapters unmerged, in float32 torch, as peft computes them.

    reference = load_reference(base_dir, adapter_dirs, tokenizer)  # streamed whenever the sources allow it
    scores = reference.score(sequences, starts)  # teacher-forced logits, with the adapters and without
    base_ids = reference.greedy_base(prompt_ids, max_new_tokens)

`StreamedReference` builds the model without weights, holds its embeddings, final norm and head and
the adapters' A and B matrices, and reads each decoder layer's weights from the safetensors shards
when the forward pass reaches the layer, dropping them after it (unless a budget lets them stay):
its peak is about one layer in f32 plus activations, not the model. The adapters are applied
unmerged, added to the targeted layers' outputs as peft's LoRA Linear adds them, and per row of a
batch, so one pass over the weights scores every sequence with the adapters and without.
`PeftReference` is peft's PeftModel on the whole base in f32: for sources the streamed one cannot
read (pickled weights, DoRA, a tokenizer larger than the embeddings, ...). The log says which runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modelrepo import ADAPTER_WEIGHTS
from tasks.loaders import load_base
from tasks.logs import step_logger
from tasks.resources import GB, WeightsSize, available_bytes, require_memory, weights_size, whole_model_needs
from tasks.stream_merge import (
    NotStreamable,
    StreamPlan,
    plan_stream_merge,
    safetensors_header,
    weight_files,
)

# A batch's logits stay under this many floats (about 1 GB); more sequences take more passes.
_MAX_BATCH_LOGITS = 256 << 20
# What a streamed pass holds beside its weights: activations, the runtime. Measured on the tiny models
# and a 1.6 B one (issue 17); the logits of a batch count on top.
_ACTIVATIONS_BYTES = 0.5 * GB
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Scores:
    """One sequence's reference logits over its continuation: row t predicts sequence[start + t]."""

    reference: np.ndarray  # (T, V) float32, with the adapters
    base: np.ndarray | None  # the same with the adapters off; None without adapters


class Reference(Protocol):
    adapters: bool

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[Scores]:
        """Teacher-forced logits of each sequence from its `start`, with the adapters and (if any) without."""
        ...

    def greedy_base(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """The base's (adapters off) greedy continuation of each prompt, up to and with its end-of-sequence token."""
        ...


def _generation_config(base_dir: Path, model: Any) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(base_dir)
    except OSError:  # no generation_config.json: the model config's defaults, as from_pretrained falls back
        return GenerationConfig.from_model_config(model.config)


def _eos_ids(generation_config: Any, tokenizer: Any) -> set[int]:
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids or {tokenizer.eos_token_id}


def _pad_id(tokenizer: Any, eos: set[int]) -> int:
    """The tokenizer's padding token, else an end-of-sequence one (padded positions are masked out or cut)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for n, t in enumerate(ids):
        if t in eos:
            return ids[: n + 1]
    return ids


class PeftReference:
    """peft's PeftModel on the whole base in f32: all adapters active at once, the sum of their deltas."""

    def __init__(self, base_dir: Path, adapter_dirs: list[Path], tokenizer: Any, *, trust_remote_code: bool = False):
        from peft import PeftModel

        self.adapters = bool(adapter_dirs)
        self._tokenizer = tokenizer
        base = load_base(base_dir, tokenizer, trust_remote_code=trust_remote_code)
        self._eos = _eos_ids(_generation_config(base_dir, base), tokenizer)
        if not adapter_dirs:
            self.model = base
            return
        model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="a0")
        for i, adapter in enumerate(adapter_dirs[1:], 1):
            model.load_adapter(adapter, adapter_name=f"a{i}")
        model.base_model.set_adapter([f"a{i}" for i in range(len(adapter_dirs))])
        self.model = model.eval()

    def _logits(self, ids: Sequence[int], start: int) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([list(ids)])).logits[0, start - 1 : len(ids) - 1].float().numpy()

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[Scores]:
        out = []
        for ids, start in zip(sequences, starts, strict=True):
            base = None
            if self.adapters:
                with self.model.disable_adapter():
                    base = self._logits(ids, start)
            out.append(Scores(self._logits(ids, start), base))
        return out

    def greedy_base(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        import contextlib

        import torch

        out = []
        for ids in prompts:
            prompt = torch.tensor([list(ids)])
            with torch.no_grad(), self.model.disable_adapter() if self.adapters else contextlib.nullcontext():
                ids_out = self.model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=_pad_id(self._tokenizer, self._eos),
                )
            out.append(_until_eos(ids_out[0, len(ids) :].tolist(), self._eos))
        return out


@dataclass(frozen=True)
class _Lora:
    a: Any  # (r, in) float32
    b: Any  # (out, r) float32
    scale: float


class StreamedReference:
    """The reference with one decoder layer's weights in memory at a time, read from the safetensors shards.

    `resident_bytes`: while it generates (one pass per token), layers whose f32 weights fit in this
    budget stay loaded after their first pass, which saves reading them again on the next. A
    scoring pass reads each layer once and keeps none.
    """

    def __init__(
        self,
        plan: StreamPlan,
        tokenizer: Any,
        *,
        resident_bytes: float = 0.0,
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        self.adapters = bool(plan.deltas)
        self._tokenizer = tokenizer
        self._budget = resident_bytes
        self._kept = 0.0
        self._generating = False
        self._rows: Any = None  # (B,) bool: the batch rows the adapters apply to; None: none
        config = AutoConfig.from_pretrained(plan.base_dir, trust_remote_code=trust_remote_code)
        # Parameters on the meta device, buffers (rotary frequencies) computed as from_pretrained computes them.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
        self.model = model.eval()
        self._eos = _eos_ids(_generation_config(plan.base_dir, model), tokenizer)

        self._shard_of: dict[str, Path] = {}
        for shard in plan.shards:
            for name in safetensors_header(plan.base_dir / shard)[1]:
                if name != "__metadata__":
                    self._shard_of[name] = plan.base_dir / shard
        groups: dict[int, list[str]] = {}  # tied parameters share one tensor: one group of names each
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        self._prefix, self._layers = _decoder_layers(model)
        self._layer_params: list[list[list[str]]] = [[] for _ in self._layers]
        resident: list[list[str]] = []
        for names in groups.values():
            stored = [n for n in names if n in self._shard_of]
            if len(stored) != 1:
                why = "none of" if not stored else "each of"
                raise NotStreamable(f"the checkpoint holds {why} {names} (tied in the model): transformers decides")
            layer = _layer_of(names[0], self._prefix)
            if layer is None:
                resident.append(names)
            elif any(_layer_of(n, self._prefix) != layer for n in names):
                raise NotStreamable(f"{names} are tied across decoder layers")
            else:
                self._layer_params[layer].append(names)
        if [n for n, b in model.named_buffers() if n in self._shard_of]:
            raise NotStreamable("the checkpoint holds buffers of the model")

        with torch.no_grad():
            self._assign(resident)
            self._loras: dict[str, list[_Lora]] = {}
            for weight, deltas in plan.deltas.items():
                module = weight.removesuffix(".weight")
                for d in deltas:
                    # Copies, not views of safetensors' buffers: torch's aligned memory, as peft's parameters.
                    with safe_open(d.adapter / ADAPTER_WEIGHTS, framework="pt") as st:
                        a = st.get_tensor(d.a_key).to(torch.float32, copy=True)
                        b = st.get_tensor(d.b_key).to(torch.float32, copy=True)
                    self._loras.setdefault(module, []).append(_Lora(a, b, d.scale))
        self._loaded = [False] * len(self._layers)
        self._resident = [False] * len(self._layers)
        self._hooks = []
        for i, layer in enumerate(self._layers):
            self._hooks.append(layer.register_forward_pre_hook(lambda _m, _a, i=i: self._load(i)))
            self._hooks.append(layer.register_forward_hook(lambda _m, _a, _o, i=i: self._release(i)))
        for module in self._loras:
            self._hooks.append(model.get_submodule(module).register_forward_hook(self._lora_hook(module)))

    def _assign(self, groups: list[list[str]]) -> float:
        """Read each group's tensor from its shard in f32 and make it the parameter of every name in it."""
        import torch
        from safetensors import safe_open

        by_shard: dict[Path, list[list[str]]] = {}
        for names in groups:
            stored = next(n for n in names if n in self._shard_of)
            by_shard.setdefault(self._shard_of[stored], []).append(names)
        total = 0.0
        for shard, shard_groups in by_shard.items():
            # Opened per layer: the mapping's resident pages are released when it closes.
            with safe_open(shard, framework="pt") as st:
                for names in shard_groups:
                    stored = next(n for n in names if n in self._shard_of)
                    param = torch.nn.Parameter(st.get_tensor(stored).to(torch.float32, copy=True), requires_grad=False)
                    for name in names:
                        owner, _, leaf = name.rpartition(".")
                        self.model.get_submodule(owner)._parameters[leaf] = param
                    total += param.numel() * 4
        return total

    def _load(self, i: int) -> None:
        if not self._loaded[i]:
            nbytes = self._assign(self._layer_params[i])
            self._loaded[i] = True
            if self._generating and self._kept + nbytes <= self._budget:
                self._kept += nbytes
                self._resident[i] = True

    def _release(self, i: int) -> None:
        import torch

        if self._resident[i]:
            return
        for names in self._layer_params[i]:
            for name in names:
                owner, _, leaf = name.rpartition(".")
                module = self.model.get_submodule(owner)
                module._parameters[leaf] = torch.nn.Parameter(
                    torch.empty_like(module._parameters[leaf], device="meta"), requires_grad=False
                )
        self._loaded[i] = False

    def _lora_hook(self, module: str) -> Any:
        import torch
        import torch.nn.functional as F

        loras = self._loras[module]

        def hook(_module: Any, args: tuple[Any, ...], output: Any) -> Any:
            if self._rows is None:
                return output
            x, result = args[0], output
            for lora in loras:  # peft's LoRA Linear, per active adapter in order: result + B(A(x)) * scaling
                result = result + F.linear(F.linear(x, lora.a), lora.b) * lora.scale
            if bool(self._rows.all()):
                return result
            return torch.where(self._rows.view(-1, *[1] * (output.dim() - 1)), result, output)

        return hook

    def _forward(self, rows: list[tuple[Sequence[int], bool]]) -> Any:
        """Logits of each row (right-padded to one length) with the adapters on where its flag says."""
        import torch

        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), _pad_id(self._tokenizer, self._eos), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (seq, _) in enumerate(rows):
            ids[r, : len(seq)] = torch.tensor(list(seq))
            mask[r, : len(seq)] = 1
        flags = torch.tensor([on for _, on in rows])
        self._rows = flags if bool(flags.any()) else None
        try:
            with torch.no_grad():
                return self.model(input_ids=ids, attention_mask=mask).logits
        finally:
            self._rows = None

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[Scores]:
        rows = [(ids, True) for ids in sequences]
        if self.adapters:
            rows += [(ids, False) for ids in sequences]
        vocab = self.model.get_output_embeddings().weight.shape[0]
        width = max(len(ids) for ids in sequences)
        per_pass = max(1, _MAX_BATCH_LOGITS // (width * vocab))
        logits: list[np.ndarray] = []
        for k in range(0, len(rows), per_pass):
            batch = rows[k : k + per_pass]
            out = self._forward(batch)
            for r, (ids, _) in enumerate(batch):
                start = starts[(k + r) % len(sequences)]
                logits.append(out[r, start - 1 : len(ids) - 1].float().numpy().copy())
            del out
        n = len(sequences)
        return [Scores(logits[i], logits[n + i] if self.adapters else None) for i in range(n)]

    def greedy_base(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """All prompts at once (left-padded): one pass over the weights per generated token."""
        import torch
        from transformers import GenerationConfig

        width = max(len(ids) for ids in prompts)
        ids = torch.full((len(prompts), width), _pad_id(self._tokenizer, self._eos), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, seq in enumerate(prompts):
            ids[r, width - len(seq) :] = torch.tensor(list(seq))
            mask[r, width - len(seq) :] = 1
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=_pad_id(self._tokenizer, self._eos),
            eos_token_id=sorted(self._eos),
        )
        self._generating = True
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        finally:
            self._generating = False
        return [_until_eos(out[r, width:].tolist(), self._eos) for r in range(len(prompts))]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def _decoder_layers(model: Any) -> tuple[str, Any]:
    """The ModuleList of decoder layers: the one holding the most parameters."""
    import torch

    best, size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = (name, module), n
    if best is None:
        raise NotStreamable(f"{type(model).__name__} has no list of decoder layers")
    return best


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    m = _LAYER_INDEX.match(name[len(prefix) :])
    return int(m.group(1)) if m else None


def streamed_needs(base_dir: Path) -> float:
    """What a streamed reference holds at its peak: the parts outside the decoder layers and two layers, in f32.

    Two layers: the one computing and, for a moment, the next one being read. Estimated from the
    safetensors headers, so it also holds when the sources need the PEFT fallback's estimate instead.
    """
    layers: dict[int, int] = {}
    other = 0
    shards, _ = weight_files(base_dir)
    for shard in shards:
        for name, meta in safetensors_header(base_dir / shard)[1].items():
            if name == "__metadata__":
                continue
            n = int(np.prod(meta["shape"], dtype=np.int64))
            m = _LAYER_INDEX.search(name)
            if m:
                layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + n
            else:
                other += n
    return 4.0 * (other + 2 * max(layers.values(), default=0)) + _ACTIVATIONS_BYTES


def reference_needs(base_dir: Path, size: WeightsSize) -> float:
    """What the reference will hold: streamed from safetensors shards, else (pickled weights) the whole model."""
    try:
        return streamed_needs(base_dir)
    except NotStreamable:
        return whole_model_needs(size)


def load_reference(
    base_dir: Path,
    adapter_dirs: list[Path],
    tokenizer: Any,
    *,
    resident_bytes: float | None = None,
    trust_remote_code: bool = False,
    plan: StreamPlan | None = None,
) -> Reference:
    """The streamed reference when the sources allow it, else peft's on the whole base (the log says why).

    `resident_bytes`: at most how much of the model (with the streamed reference's own need) may stay
    loaded between passes, and never more than half of what is available beyond that need.
    `plan`: plan_stream_merge's answer for these sources, when the caller already has it.
    """
    log = step_logger(__name__)
    try:
        if plan is None:
            plan = plan_stream_merge(
                base_dir, adapter_dirs, vocab_size=len(tokenizer), trust_remote_code=trust_remote_code
            )
        need = streamed_needs(base_dir)
        spare = (available_bytes() - need) / 2
        resident_bytes = max(0.0, spare if resident_bytes is None else min(spare, resident_bytes - need))
        reference = StreamedReference(
            plan, tokenizer, resident_bytes=resident_bytes, trust_remote_code=trust_remote_code
        )
    except NotStreamable as e:
        log.info("reference: peft on the whole base in f32, not streamed: %s", e)
        require_memory("the PEFT reference (the whole base in f32)", whole_model_needs(weights_size(base_dir)))
        return PeftReference(base_dir, adapter_dirs, tokenizer, trust_remote_code=trust_remote_code)
    log.info(
        "reference: streamed layer by layer from %s (up to %.1f GB of layers kept loaded if it generates)",
        base_dir,
        resident_bytes / GB,
    )
    return reference

"""Merge LoRA adapters into a safetensors base tensor by tensor, in the checkpoint's own dtype, as peft computes it.

    plan = plan_stream_merge(base_dir, adapter_dirs, vocab_size=len(tokenizer))  # NotStreamable: use peft
    changed = stream_merge(plan, out_dir)

Each output shard starts as a byte copy of the base's (header, metadata and untouched tensors stay
bit for bit); each weight an adapter targets is then read alone, merged in float32 exactly as
peft's LoRA Linear merges it into a base loaded in float32, rounded once to the checkpoint's dtype
and written over its own bytes. The peak memory is one weight and its f32 copies, never the model.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelrepo import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tasks.errors import SourceError

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Files of the base the merged folder keeps as they are (the tokenizer is saved by the caller, as the peft path does).
CONFIG_FILES = ("config.json", "generation_config.json")
# Checkpoint dtypes merged in f32 and rounded back; others (int8, fp8) are quantized weights peft would dequantize.
_FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# The only keys a plain LoRA-on-Linear adapter holds (peft saves them without the adapter name).
_LORA_WEIGHT = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# adapter_config.json fields whose effect the streamed merge reproduces, or which do not touch the merge;
# any other field must hold peft's default (DoRA, lora_bias, modules_to_save, trainable tokens, ...).
_APPLIED_FIELDS = frozenset(
    {
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "fan_in_fan_out",
        "lora_dropout",
        "init_lora_weights",
        "inference_mode",
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "auto_mapping",
        "peft_version",
    }
)
# Initialisations that leave the base weights alone when peft loads the adapter (pissa, olora, corda, loftq
# rewrite them from the base at load time).
_PLAIN_INITS: tuple[bool | str, ...] = (True, False, "gaussian")


class NotStreamable(Exception):
    """Why the streamed merge does not apply to these sources: the peft path merges them instead."""


@dataclass(frozen=True)
class LoraDelta:
    """One adapter's change to one base weight: transpose(B @ A, fan_in_fan_out) * scale, as peft computes it."""

    adapter: Path
    a_key: str
    b_key: str
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, after rank_pattern and alpha_pattern
    fan_in_fan_out: bool  # the base layer stores (in, out): transformers' Conv1D


@dataclass(frozen=True)
class StreamPlan:
    """What to write: the base's weight files, and for each targeted weight its deltas in adapter order."""

    base_dir: Path
    shards: tuple[str, ...]  # weight files, relative to base_dir
    index: str | None  # model.safetensors.index.json when the base is sharded
    deltas: dict[str, tuple[LoraDelta, ...]]  # base weight name -> its deltas, applied in order


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Where `path`'s tensor data starts, and its header: {name: {"dtype", "shape", "data_offsets"}, ...}."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} is not a readable safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path} is not a safetensors file: its header is not a JSON object")
    return 8 + size, header


def weight_files(base_dir: Path) -> tuple[tuple[str, ...], str | None]:
    """The base's safetensors files, chosen as transformers chooses them: model.safetensors, else the index."""
    if (base_dir / WEIGHTS).is_file():
        return (WEIGHTS,), None
    if not (base_dir / WEIGHTS_INDEX).is_file():
        raise NotStreamable(f"base {base_dir} has no {WEIGHTS} nor {WEIGHTS_INDEX}: its weights are pickled")
    try:
        weight_map = json.loads((base_dir / WEIGHTS_INDEX).read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise SourceError(f"base {base_dir}: {WEIGHTS_INDEX} is not a safetensors index: {e!r}") from None
    shards = tuple(sorted(set(weight_map.values())))
    if missing := [s for s in shards if not (base_dir / s).is_file()]:
        raise SourceError(f"base {base_dir}: {WEIGHTS_INDEX} names shards that are missing: {missing}")
    return shards, WEIGHTS_INDEX


def _check_config_fields(adapter: Path, acfg: dict[str, Any]) -> None:
    """Refuse any adapter_config.json field that would make peft's merge differ from a plain LoRA delta."""
    from peft import LoraConfig

    defaults = {f.name: f.default for f in LoraConfig.__dataclass_fields__.values()}
    defaults |= {
        f.name: f.default_factory()  # type: ignore[misc]
        for f in LoraConfig.__dataclass_fields__.values()
        if callable(f.default_factory)
    }
    for field, value in sorted(acfg.items()):
        if field in _APPLIED_FIELDS or value == defaults.get(field) or (not value and not defaults.get(field)):
            continue
        raise NotStreamable(f"adapter {adapter} sets {field}={value!r}, which only peft's merge applies")
    if acfg.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise NotStreamable(
            f"adapter {adapter} sets init_lora_weights={acfg['init_lora_weights']!r}, "
            "which rewrites the base weights when peft loads it"
        )
    targets = acfg.get("target_modules")
    if targets is None or targets == "all-linear":
        raise NotStreamable(f"adapter {adapter} sets target_modules={targets!r}: peft chooses the modules itself")


def meta_skeleton(base_dir: Path, trust_remote_code: bool) -> Any:
    """The base's model on the meta device (no memory): its module types, tied weights and embedding rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # whatever stops transformers here stops the peft path too, which reports it in full
        raise NotStreamable(f"transformers cannot build base {base_dir} without its weights: {e}") from None


def _converted_on_load(skeleton: Any) -> bool:
    """Whether transformers renames or fuses this architecture's checkpoint weights as it loads them (MoE experts)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return bool(get_model_conversion_mapping(skeleton, add_legacy=False))


def _adapter_deltas(
    adapter: Path, skeleton: Any, tied: dict[str, list[str]], base_header: dict[str, dict[str, Any]]
) -> dict[str, LoraDelta]:
    """The adapter's delta for each base weight it changes, checked to be what peft's LoRA Linear would merge."""
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from transformers.pytorch_utils import Conv1D

    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise NotStreamable(f"adapter {adapter} has no {ADAPTER_WEIGHTS}: its weights are pickled")
    acfg = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    _check_config_fields(adapter, acfg)
    config = LoraConfig.from_pretrained(str(adapter))  # peft's own reading, for peft's own target matching

    _, header = safetensors_header(adapter / ADAPTER_WEIGHTS)
    parts: dict[str, dict[str, str]] = {}
    for key, meta in sorted(header.items()):
        if key == "__metadata__":
            continue
        m = _LORA_WEIGHT.match(key)
        if m is None:
            raise NotStreamable(
                f"adapter {adapter} holds {key}, not a LoRA A/B weight of a Linear "
                "(embedding LoRA, DoRA magnitude, lora_bias or a module to save)"
            )
        if meta["dtype"] not in _FLOAT_DTYPES or len(meta["shape"]) != 2:
            raise NotStreamable(f"adapter {adapter}: {key} is {meta['dtype']} {meta['shape']}, not a float matrix")
        parts.setdefault(m["module"], {})[m["part"]] = key
    if halves := sorted(m for m, p in parts.items() if len(p) != 2):
        raise NotStreamable(f"adapter {adapter} holds only one of lora_A and lora_B for {halves[:3]}")

    # peft wraps the modules its config matches and drops weights for any other: both sets must agree.
    targeted = {name for name, _ in skeleton.named_modules() if name and check_target_module_exists(config, name)}
    if extra := sorted(targeted - parts.keys()):
        raise NotStreamable(
            f"adapter {adapter}: its target_modules match {extra[:3]} too, which it holds no weights for"
        )
    if dropped := sorted(parts.keys() - targeted):
        raise NotStreamable(f"adapter {adapter} holds weights for {dropped[:3]}, which its target_modules do not match")

    deltas: dict[str, LoraDelta] = {}
    for module, keys in sorted(parts.items()):
        layer = skeleton.get_submodule(module)
        if isinstance(layer, torch.nn.Linear):
            fan_in_fan_out = False  # peft turns fan_in_fan_out off on a Linear
        elif isinstance(layer, Conv1D):
            fan_in_fan_out = True  # ... and on for a Conv1D, whose weight is (in, out)
        else:
            raise NotStreamable(f"adapter {adapter} targets {module}, a {type(layer).__name__}, not a Linear")
        weight = f"{module}.weight"
        if len(tied.get(weight, [])) > 1:
            raise NotStreamable(f"adapter {adapter} targets {weight}, which is tied to {tied[weight]}")
        meta = base_header.get(weight)
        if meta is None or meta["dtype"] not in _FLOAT_DTYPES or len(meta["shape"]) != 2:
            found = "nothing" if meta is None else f"{meta['dtype']} {meta['shape']}"
            raise NotStreamable(f"adapter {adapter} targets {weight}, which the base checkpoint holds as {found}")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        out_f, in_f = reversed(meta["shape"]) if fan_in_fan_out else meta["shape"]
        a_shape, b_shape = header[keys["A"]]["shape"], header[keys["B"]]["shape"]
        if a_shape != [r, in_f] or b_shape != [out_f, r]:
            raise NotStreamable(
                f"adapter {adapter}: {module} has lora_A {a_shape} and lora_B {b_shape}, "
                f"peft expects {[r, in_f]} and {[out_f, r]} (rank {r}, base weight {meta['shape']})"
            )
        # peft's LoraLayer.update_layer, to the bit: a Python float, math.sqrt for rsLoRA.
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        deltas[weight] = LoraDelta(adapter, keys["A"], keys["B"], scale, fan_in_fan_out)
    return deltas


def plan_stream_merge(
    base_dir: Path, adapter_dirs: list[Path], *, vocab_size: int, trust_remote_code: bool = False
) -> StreamPlan:
    """What the streamed merge will write, or NotStreamable saying why peft has to merge these sources.

    Call it after `check_adapter_fits`: misfits are reported there, by name.
    """
    if sys.byteorder != "little":
        raise NotStreamable(f"this machine is {sys.byteorder}-endian; safetensors data is little-endian")
    shards, index = weight_files(base_dir)
    base_header: dict[str, dict[str, Any]] = {}
    for shard in shards:
        base_header |= {k: v for k, v in safetensors_header(base_dir / shard)[1].items() if k != "__metadata__"}

    skeleton = meta_skeleton(base_dir, trust_remote_code)
    rows = skeleton.get_input_embeddings().weight.shape[0]
    if vocab_size > rows:
        raise NotStreamable(f"the tokenizer has {vocab_size} tokens and the embeddings {rows} rows: they must grow")
    if adapter_dirs and _converted_on_load(skeleton):
        raise NotStreamable(
            f"transformers converts {skeleton.config.model_type} checkpoints as it loads them (renames, fused experts)"
        )
    by_tensor: dict[int, list[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    tied = {name: names for names in by_tensor.values() for name in names}

    deltas: dict[str, list[LoraDelta]] = {}
    for adapter in adapter_dirs:
        for weight, delta in _adapter_deltas(adapter, skeleton, tied, base_header).items():
            deltas.setdefault(weight, []).append(delta)
    return StreamPlan(base_dir, shards, index, {w: tuple(ds) for w, ds in sorted(deltas.items())})


def merge_weight(name: str, weight: Any, deltas: tuple[LoraDelta, ...]) -> Any:
    """`weight` with each delta added in turn in f32, as peft's safe merge adds it; rounded once to its own dtype."""
    import torch
    from safetensors import safe_open

    low = high = 0.0
    merged = weight.to(torch.float32, copy=True)  # peft: `orig_weight = base_layer.weight.data.clone()`, in f32
    for d in deltas:
        # Copies into torch's own 64-byte aligned memory, like peft's parameters: MKL's summation order (hence
        # the last bit) may depend on alignment, and the buffers safetensors hands back are not aligned so.
        # Opened per weight, like the base's shards, so no mapping keeps a whole adapter resident.
        with safe_open(d.adapter / ADAPTER_WEIGHTS, framework="pt") as lora:
            a = lora.get_tensor(d.a_key).to(torch.float32, copy=True)  # (r, in)
            b = lora.get_tensor(d.b_key).to(torch.float32, copy=True)  # (out, r)
        delta = b @ a
        merged += (delta.T if d.fan_in_fan_out else delta) * d.scale
        del a, b, delta
        # peft's safe merge checks isfinite(w).all(); min and max say the same (NaN propagates) in a fifth the time.
        low, high = (v.item() for v in torch.aminmax(merged))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise SourceError(
                f"adapter {d.adapter} makes {name} non-finite (min {low}, max {high}) when merged: "
                "the adapter seems broken"
            )
    # Rounding is monotonic: the weight fits its dtype when its extremes do.
    if not torch.isfinite(torch.tensor([low, high]).to(weight.dtype)).all():
        raise SourceError(
            f"{name} merged with adapters {[str(d.adapter) for d in deltas]} exceeds {weight.dtype}: "
            f"its values span [{low:.6g}, {high:.6g}]"
        )
    return merged.to(weight.dtype)


def _merge_shard(src: Path, dest: Path, plan: StreamPlan) -> int:
    """Copy one shard, then overwrite the bytes of each weight the adapters change; how many it changed."""
    import torch
    from safetensors import safe_open

    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)  # header, metadata and untouched tensors, byte for byte (sendfile: no RSS)
    data_start, header = safetensors_header(src)
    targets = sorted((n for n in header if n in plan.deltas), key=lambda n: header[n]["data_offsets"][0])
    if not targets:
        return 0
    with open(dest, "r+b") as out:
        for name in targets:
            # get_tensor copies out of safe_open's mapping of `src`, whose pages stay resident while it is open:
            # opened per weight, the mapping never holds more than that weight (kept open: a shard's worth).
            with safe_open(src, framework="pt") as st:
                weight = st.get_tensor(name)
            merged = merge_weight(name, weight, plan.deltas[name])
            del weight
            raw = merged.contiguous().view(-1).view(torch.uint8)
            begin, end = header[name]["data_offsets"]
            if raw.numel() != end - begin:  # same dtype and shape: cannot happen unless the header lies
                raise SourceError(f"{src}: {name} takes {end - begin} bytes in the header, {raw.numel()} merged")
            out.seek(data_start + begin)
            out.write(raw.numpy().data)
    return len(targets)


def stream_merge(plan: StreamPlan, out_dir: Path) -> int:
    """Write the merged weights (the base's shard layout and index), config.json and generation_config.json.

    Returns how many weights the adapters changed. `out_dir` exists and is empty (an `atomic_output` scratch).
    """
    changed = sum(_merge_shard(plan.base_dir / shard, out_dir / shard, plan) for shard in plan.shards)
    if plan.index:  # same files, names, dtypes and sizes: the index holds as it is
        shutil.copyfile(plan.base_dir / plan.index, out_dir / plan.index)
    for name in CONFIG_FILES:
        if (plan.base_dir / name).is_file():
            shutil.copyfile(plan.base_dir / name, out_dir / name)
    if "auto_map" in json.loads((plan.base_dir / "config.json").read_text(encoding="utf-8")):
        for code in plan.base_dir.glob("*.py"):  # remote code the config names, as save_pretrained copies it
            shutil.copyfile(code, out_dir / code.name)
    if changed != len(plan.deltas):  # a weight in no shard, or in two
        raise SourceError(f"base {plan.base_dir}: {changed} weights merged, the adapters target {len(plan.deltas)}")
    return changed

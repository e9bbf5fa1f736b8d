"""Whether a PEFT LoRA adapter fits its base: every target module exists, every tensor has the base's shape."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelrepo import ADAPTER_CONFIG, RepositoryError
from modelrepo.manifest import read_json_object
from tasks.errors import AdapterMismatch, SourceError

# peft's saved keys: base_model.model.<module>.lora_A.weight (and lora_B, lora_embedding_A/B, DoRA magnitudes).
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$"
)


@dataclass(frozen=True)
class AdapterFit:
    """What the fit check learned about an adapter: what `AdapterConfig` in openvino-genai needs too."""

    adapter: Path
    rank: int
    lora_alpha: float
    scale: float  # lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)); openvino-genai takes it explicitly
    target_modules: tuple[str, ...]
    modules: int  # how many base modules the adapter changes


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except RepositoryError as e:  # a source, not the repository, is at fault here
        raise SourceError(f"{what}: {e}") from None


def tensor_shapes(folder: Path, stem: str, *, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors in `folder`'s `stem*.safetensors` files, read from headers without loading data."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(folder.glob(f"{stem}*.safetensors"))
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[k] = tuple(st.get_slice(k).get_shape())
    if not files and allow_pickle:
        import torch

        for f in sorted(folder.glob(f"{stem}*.bin")):
            shapes |= {k: tuple(v.shape) for k, v in torch.load(f, map_location="meta", weights_only=True).items()}
    if not shapes:
        raise SourceError(f"{folder} holds no {stem}*.safetensors weights")
    return shapes


def check_adapter_fits(
    base_dir: Path,
    adapter_dir: Path,
    *,
    vocab_size: int | None = None,
    allow_pickle: bool = False,
    base_shapes: dict[str, tuple[int, ...]] | None = None,
) -> AdapterFit:
    """Check, before peft loads anything, that every adapter weight lands on a base module of the right shape.

    peft accepts some misfits silently (unmatched keys are dropped) and reports others as a size
    error deep in torch; this names the module and both shapes instead.
    """
    config = _read_json(base_dir / "config.json", f"base {base_dir}")
    acfg = _read_json(adapter_dir / ADAPTER_CONFIG, f"adapter {adapter_dir}")
    arch = config.get("model_type", "?")
    trained_on = acfg.get("base_model_name_or_path") or "an unrecorded base"
    where = f"adapter {adapter_dir} (trained on {trained_on}) does not fit base {base_dir} ({arch})"
    if acfg.get("peft_type") != "LORA":
        raise AdapterMismatch(
            f"adapter {adapter_dir}: peft_type is {acfg.get('peft_type')!r}, only LORA adapters merge"
        )
    rank, alpha = acfg.get("r"), acfg.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterMismatch(
            f"adapter {adapter_dir}: r and lora_alpha must be positive, got r={rank!r} lora_alpha={alpha!r}"
        )
    trained_config = Path(str(trained_on)) / "config.json"
    if trained_config.is_file():
        trained_arch = _read_json(trained_config, "trained-on base").get("model_type")
        if trained_arch and trained_arch != arch:
            raise AdapterMismatch(f"{where}: it was trained on a {trained_arch} model, the base is {arch}")

    base = base_shapes if base_shapes is not None else tensor_shapes(base_dir, "model", allow_pickle=allow_pickle)
    adapter = tensor_shapes(adapter_dir, "adapter_model", allow_pickle=allow_pickle)
    targets = acfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]  # a regex in peft; matched below against module names
    module_names = {k.rsplit(".", 1)[0] for k in base if k.endswith(".weight")}
    missing_targets = [
        t
        for t in targets
        if not any(m == t or m.endswith("." + t) or (len(targets) == 1 and re.fullmatch(t, m)) for m in module_names)
    ]
    if missing_targets:
        raise AdapterMismatch(f"{where}: target modules {missing_targets} match no module of the base")

    fan_in_fan_out = bool(acfg.get("fan_in_fan_out"))
    rank_pattern: dict[str, int] = acfg.get("rank_pattern") or {}
    modules: set[str] = set()
    for key, shape in sorted(adapter.items()):
        m = _LORA_KEY.match(key)
        if m is None:
            continue  # modules_to_save copies and DoRA magnitudes are checked by peft itself
        module, part = m["module"], m["part"]
        weight = f"{module}.weight"
        if weight not in base:
            layers = sorted({int(x) for k in base for x in re.findall(r"\.layers\.(\d+)\.", k)})
            extra = f" (the base has {len(layers)} layers)" if layers else ""
            raise AdapterMismatch(f"{where}: it changes {module}, which the base does not have{extra}")
        out_f, in_f = base[weight][:2] if len(base[weight]) >= 2 else (base[weight][0], 1)
        if fan_in_fan_out:
            out_f, in_f = in_f, out_f
        if part == "lora_embedding_A":  # (r, num_embeddings): the vocabulary may have grown with --tokenizer
            out_f, in_f = in_f, max(out_f, vocab_size or 0)
        r = next((v for p, v in rank_pattern.items() if module == p or module.endswith("." + p)), rank)
        expected = (r, in_f) if part.endswith("A") else (out_f, r)
        if part == "lora_embedding_A" and len(shape) == 2 and shape[0] == r and out_f <= shape[1] <= in_f:
            expected = shape
        if tuple(shape) != expected:
            raise AdapterMismatch(
                f"{where}: {module}.{part} is {list(shape)}, expected {list(expected)} "
                f"for a base weight of {list(base[weight])} at rank {r}"
            )
        modules.add(module)
    if not modules:
        raise AdapterMismatch(f"{where}: its weights hold no LoRA matrices (no base_model.model.*.lora_A/B keys)")
    scale = alpha / rank**0.5 if acfg.get("use_rslora") else alpha / rank
    return AdapterFit(adapter_dir, rank, float(alpha), float(scale), tuple(sorted(targets)), len(modules))

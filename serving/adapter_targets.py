"""Which of a model's weights a LoRA adapter file changes, read from its safetensors header (no tensor is loaded).

openvino-genai's dynamic LoRA mode puts a variable beside each weight that the adapters registered at
construction change; any adapter whose tensors fall on those weights, with the same element type, can
then be applied per request without compiling the pipeline again (the rank is dynamic). An adapter
that changes a weight with no variable would be applied in part, silently: it needs a new pipeline.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

Target = tuple[str, str]  # (tensor name up to ".lora_A" / ".lora_B" plus which of the two, element type)

_MAX_HEADER = 100 << 20  # the format's own limit on its JSON header


@functools.lru_cache(maxsize=1024)  # read at every reload by the registry and each engine: version files are immutable
def targets(path: Path) -> frozenset[Target]:
    """The LoRA tensors of an adapter_model.safetensors as (module.lora_A or .lora_B, dtype); raises ValueError."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file: {len(raw)} bytes")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file: a header of {size} bytes")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not an object")
    found: set[Target] = set()
    for name, info in header.items():
        for part in (".lora_A", ".lora_B"):
            if part in name and isinstance(info, dict):
                found.add((name[: name.index(part) + len(part)], str(info.get("dtype"))))
    if not found:
        raise ValueError(f"{path} has no lora_A / lora_B tensors")
    return frozenset(found)


def uncovered(path: Path, compiled: frozenset[Target]) -> list[str]:
    """The LoRA tensors of `path` that a pipeline compiled for `compiled` has no variable for (empty: it fits)."""
    return sorted(f"{name} ({dtype})" for name, dtype in targets(path) - compiled)

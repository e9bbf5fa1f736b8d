"""What the server needs to know about a version folder before it generates: context length, defaults, files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import modelrepo
from modelrepo.numerics import Numerics, pinned

MODEL_XML = "openvino_model.xml"
GENERATION_CONFIG = "generation_config.json"
# When config.json names no context length: a conservative default rather than unlimited.
DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class ModelInfo:
    folder: Path
    context_length: int  # tokens, prompt and completion together
    numerics: Numerics | None = None  # what the version pins; None: built before versions pinned their numerics

    @property
    def generation_config(self) -> str:
        """Path of generation_config.json, the model's own defaults (genai reads it)."""
        return str(self.folder / GENERATION_CONFIG)


def read_model_info(folder: Path) -> ModelInfo:
    """Read the context length from the HF config.json and the pinned numerics from the manifest; check the files."""
    for needed in (MODEL_XML, GENERATION_CONFIG, "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder} has no {needed}")
    context = DEFAULT_CONTEXT
    config = folder / "config.json"
    if config.is_file():
        body = json.loads(config.read_text(encoding="utf-8"))
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(body.get(key), int) and body[key] > 0:
                context = body[key]
                break
    manifest = modelrepo.read_manifest(folder) if (folder / modelrepo.MANIFEST).is_file() else {}
    return ModelInfo(folder=folder, context_length=context, numerics=pinned(manifest))

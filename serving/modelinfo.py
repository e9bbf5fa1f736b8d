"""What the server needs to know about a version folder before it generates: context length, defaults, files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import openvino_genai as ov_genai

import modelrepo
from modelrepo.numerics import Numerics, pinned
from serving.detokenizer import DETOKENIZER_XML
from serving.engine_core import build_config, config_fields

MODEL_XML = "openvino_model.xml"
GENERATION_CONFIG = "generation_config.json"
# When config.json names no context length: a conservative default rather than unlimited.
DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class ModelInfo:
    folder: Path
    context_length: int  # tokens, prompt and completion together
    numerics: Numerics | None = None  # what the version pins; None: built before versions pinned their numerics
    # generation_config.json as GenerationConfig fields, read once at load: a request never reads the version's
    # folder, which a replica's cache evicts as soon as the version is replaced (a request may still be on it).
    generation_defaults: dict[str, object] = field(default_factory=dict)

    def generation_config(self) -> ov_genai.GenerationConfig:
        """A new GenerationConfig holding the model's own defaults."""
        return build_config(self.generation_defaults)


def read_model_info(folder: Path) -> ModelInfo:
    """Read the context length from the HF config.json and the pinned numerics from the manifest; check the files."""
    for needed in (MODEL_XML, GENERATION_CONFIG, "openvino_tokenizer.xml", DETOKENIZER_XML):
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
    defaults = config_fields(ov_genai.GenerationConfig(str(folder / GENERATION_CONFIG)))
    return ModelInfo(folder=folder, context_length=context, numerics=pinned(manifest), generation_defaults=defaults)

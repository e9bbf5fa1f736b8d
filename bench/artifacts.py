"""The models every benchmark serves, built once and cached: base IRs (fp16, int8), merged models and their IRs.

Keyed on the sources, this file and the OpenVINO/optimum versions (not on tasks/export.py, which
the build benchmark measures fresh on every run anyway).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench.model import build_once, default_cache, ensure_bench_sources


@dataclass(frozen=True)
class Sources:
    """A base model folder and its PEFT adapters, whatever made them (bench.model or the demo)."""

    name: str  # "smollm2-135m-shape" or "demo-tiny"
    key: str  # changes whenever the sources do
    base: Path
    adapters: list[Path]

    def alpha(self, i: int) -> float:
        """openvino-genai's alpha for adapter i: lora_alpha / r (it ignores adapter_config.json)."""
        body = json.loads((self.adapters[i] / "adapter_config.json").read_text(encoding="utf-8"))
        return float(body["lora_alpha"]) / float(body["r"])


@dataclass(frozen=True)
class Artifacts:
    root: Path
    sources: Sources

    def ir(self, name: str) -> Path:
        """base_fp16, base_int8, merged0_fp16, ...: an IR folder that `python -m serving` and genai load."""
        return self.root / name

    @property
    def merged0_hf(self) -> Path:
        """The base with adapter 0 merged, as a HF folder (what transformers generate serves)."""
        return self.root / "merged0_hf"

    def merged_ir(self, i: int) -> Path:
        return self.root / f"merged{i}_fp16"


def bench_sources() -> Sources:
    src = ensure_bench_sources()
    return Sources("smollm2-135m-shape", src.key, src.base, src.adapters)


def demo_sources() -> Sources:
    from demo.make_sources import ensure_demo_sources

    src = ensure_demo_sources()
    return Sources("demo-tiny", src.key, src.base, [src.sql_adapter, src.spell_adapter])


def _key(sources: Sources) -> str:
    h = hashlib.sha256()
    h.update(sources.key.encode())
    h.update(Path(__file__).read_bytes())
    for dist in ("openvino", "optimum-intel", "nncf", "transformers", "peft"):
        h.update(f"{dist}={metadata.version(dist)}".encode())
    return h.hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[bench artifacts] {msg}", flush=True)


def make_artifacts(sources: Sources, out: Path) -> None:
    from tasks.export import export_openvino
    from tasks.merge import merge_adapters

    out.mkdir(parents=True)
    t0 = time.monotonic()
    for fmt in ("fp16", "int8"):
        _log(f"exporting the base ({fmt})")
        export_openvino(sources.base, out / f"base_{fmt}", fmt)  # type: ignore[arg-type]
    for i, adapter in enumerate(sources.adapters):
        _log(f"merging adapter {i} and exporting it (fp16) [{time.monotonic() - t0:.0f} s]")
        merged = out / f"merged{i}_hf"
        merge_adapters(sources.base, [adapter], merged)
        export_openvino(merged, out / f"merged{i}_fp16", "fp16")
        if i > 0:
            shutil.rmtree(merged)  # only merged0 is served by transformers
    _log(f"artifacts in {out} ({time.monotonic() - t0:.0f} s)")


def ensure_artifacts(sources: Sources) -> Artifacts:
    final = default_cache() / "artifacts" / f"{sources.name}-{_key(sources)}"
    return Artifacts(build_once(final, lambda out: make_artifacts(sources, out)), sources)


if __name__ == "__main__":
    import sys

    smoke = "--smoke" in sys.argv
    print(ensure_artifacts(demo_sources() if smoke else bench_sources()).root)

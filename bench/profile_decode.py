"""Where one stream's per-token time goes in OpenVINO's CPU plugin: a per-layer-type profile of decoding.

    python -m bench.profile_decode [IR folder ...] [--tokens 64] [--threads N]

Compiles each IR's stateful model (the layers are those the serving pipeline runs; it replaces the
attention with paged attention, a few percent of the time) with PERF_COUNT on and the version's
pinned numerics, prefills the benchmark's 64-token prompt length, then decodes `--tokens` tokens one
at a time, and prints the time per layer type and kernel, summed over the decode steps, with the
weight bytes each token reads. Without folders: the benchmark's base IRs, fp16 and int8.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np
import openvino as ov

from modelrepo.numerics import default_numerics, engine_properties
from serving.modelinfo import read_model_info

PROMPT_TOKENS = 65  # the benchmark's 64 tokens and BOS


def profile(folder: Path, tokens: int, threads: int | None, top: int = 8) -> str:
    numerics = read_model_info(folder).numerics or default_numerics()
    properties: dict[str, object] = {**engine_properties(numerics), "PERF_COUNT": True}
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(folder / "openvino_model.xml"), "CPU", properties)
    request = compiled.create_infer_request()

    def infer(ids: list[int], past: int) -> int:
        n = len(ids)
        request.infer({
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past + n), dtype=np.int64),
            "position_ids": np.arange(past, past + n, dtype=np.int64)[None],
            "beam_idx": np.zeros(1, dtype=np.int32),
        })
        return int(request.get_tensor("logits").data[0, -1].argmax())

    by_kind: collections.Counter[str] = collections.Counter()
    for measured in (False, True):  # the first pass compiles the kernels for each shape
        request.reset_state()
        token = infer(list(range(100, 100 + PROMPT_TOKENS)), 0)
        started = time.perf_counter()
        for i in range(tokens):
            token = infer([token], PROMPT_TOKENS + i)
            if measured:
                for layer in request.profiling_info:
                    by_kind[f"{layer.node_type} ({layer.exec_type})"] += layer.real_time.total_seconds()
        elapsed = (time.perf_counter() - started) / tokens
    weights = (folder / "openvino_model.bin").stat().st_size
    total = sum(by_kind.values()) / tokens
    lines = [
        f"{folder.name}: {1000 * elapsed:.2f} ms/token ({1 / elapsed:.1f} tok/s), layers {1000 * total:.2f} ms; "
        f"{weights / 1e6:.0f} MB of weights read per token = {weights / elapsed / 1e9:.1f} GB/s",
    ]
    for kind, seconds in by_kind.most_common(top):
        lines.append(f"  {1000 * seconds / tokens:7.3f} ms  {100 * seconds / tokens / total:5.1f}%  {kind}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="INFERENCE_NUM_THREADS (default: the plugin's)")
    args = parser.parse_args()
    folders = args.folders
    if not folders:
        from bench.artifacts import bench_sources, ensure_artifacts

        art = ensure_artifacts(bench_sources())
        folders = [art.ir("base_fp16"), art.ir("base_int8")]
    print(f"CPU: {ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')}, "
          f"{ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}")
    for folder in folders:
        print(profile(folder, args.tokens, args.threads))


if __name__ == "__main__":
    main()

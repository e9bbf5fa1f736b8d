"""Where one stream's per-token time goes in OpenVINO's CPU plugin: a per-layer-type profile of decoding.

    python -m bench.profile_decode [IR folder ...] [--tokens 64] [--threads N] [--lora none|state|const]

Compiles each IR's stateful model (the layers are those the serving pipeline runs; it replaces the
attention with paged attention, a few percent of the time) with PERF_COUNT on and the version's
pinned numerics, prefills the benchmark's 64-token prompt length, then decodes `--tokens` tokens one
at a time, and prints the time per layer type and kernel, summed over the decode steps, with the
weight bytes each token reads. Without folders: the benchmark's base IRs, fp16 and int8.

`--lora` adds a rank-8 LoRA to the seven Llama linears of every layer, built as openvino-genai builds it
(`lora/adapter.cpp`: MatMul A, Multiply alpha, MatMul B, Add): `state` holds A, alpha and B in variables
(ReadValue + Assign, a dynamic rank: its MODE_DYNAMIC, what runtime adapters use), `const` in constants
(its MODE_STATIC, the adapter fixed at compile time). Where a runtime adapter's per-token cost goes.
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
LORA_RANK = 8
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: ov.Model, kind: str) -> dict[str, np.ndarray]:
    """Add a random rank-8 LoRA beside each target linear, as openvino-genai does; the variables' values by id."""
    import openvino.opset13 as ops
    from openvino.op.util import Variable, VariableInfo

    rng = np.random.default_rng(0)
    values: dict[str, np.ndarray] = {}
    targets = [n for n in model.get_ordered_ops() if n.get_type_name() == "MatMul"
               and any(f"{t}/" in n.get_friendly_name() for t in LORA_TARGETS)]
    for i, node in enumerate(targets):
        out_features, in_features = (d.get_length() for d in node.input_value(1).get_partial_shape())
        parts = []
        for label, value in (
            ("A", rng.standard_normal((LORA_RANK, in_features)).astype(np.float32) * 0.01),
            ("alpha", np.full((1, LORA_RANK), 2.0, np.float32)),
            ("B", rng.standard_normal((out_features, LORA_RANK)).astype(np.float32) * 0.01),
        ):
            if kind == "const":
                parts.append(ops.constant(value))
                continue
            info = VariableInfo()
            info.variable_id, info.data_type = f"lora_{i}.{label}", ov.Type.f32
            info.data_shape = ov.PartialShape([-1 if d == LORA_RANK else d for d in value.shape])  # dynamic rank
            variable = Variable(info)
            read = ops.read_value(variable)
            model.add_variables([variable])
            model.add_sinks([ops.assign(read, variable)])  # genai adds one too: the CPU plugin requires it
            values[info.variable_id] = value
            parts.append(read)
        delta = ops.matmul(ops.multiply(ops.matmul(node.input_value(0), parts[0], False, True), parts[1]),
                           parts[2], False, True)
        consumers = node.output(0).get_target_inputs()
        total = ops.add(node.output(0), delta)
        for consumer in consumers:
            consumer.replace_source_output(total.output(0))
    model.validate_nodes_and_infer_types()
    return values


def profile(folder: Path, tokens: int, threads: int | None, lora: str = "none", top: int = 8) -> str:
    numerics = read_model_info(folder).numerics or default_numerics()
    properties: dict[str, object] = {**engine_properties(numerics), "PERF_COUNT": True}
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    model = core.read_model(folder / "openvino_model.xml")
    lora_values = add_lora(model, lora) if lora != "none" else {}
    compiled = core.compile_model(model, "CPU", properties)
    request = compiled.create_infer_request()

    def reset() -> None:
        request.reset_state()
        for state in request.query_state():
            if state.name in lora_values:
                state.state = ov.Tensor(lora_values[state.name])

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
    calls: collections.Counter[str] = collections.Counter()
    for measured in (False, True):  # the first pass compiles the kernels for each shape
        reset()
        token = infer(list(range(100, 100 + PROMPT_TOKENS)), 0)
        started = time.perf_counter()
        for i in range(tokens):
            token = infer([token], PROMPT_TOKENS + i)
            if measured:
                for layer in request.profiling_info:
                    by_kind[f"{layer.node_type} ({layer.exec_type})"] += layer.real_time.total_seconds()
                    calls[f"{layer.node_type} ({layer.exec_type})"] += 1
        elapsed = (time.perf_counter() - started) / tokens
    weights = (folder / "openvino_model.bin").stat().st_size
    total = sum(by_kind.values()) / tokens
    lines = [
        f"{folder.name}{'' if lora == 'none' else f' + LoRA ({lora})'}: "
        f"{1000 * elapsed:.2f} ms/token ({1 / elapsed:.1f} tok/s), layers {1000 * total:.2f} ms; "
        f"{weights / 1e6:.0f} MB of weights read per token = {weights / elapsed / 1e9:.1f} GB/s",
    ]
    for kind, seconds in by_kind.most_common(top):
        lines.append(f"  {1000 * seconds / tokens:7.3f} ms  {100 * seconds / tokens / total:5.1f}%  "
                     f"{calls[kind] // tokens:4d}/token  {kind}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="INFERENCE_NUM_THREADS (default: the plugin's)")
    parser.add_argument("--lora", choices=("none", "state", "const"), default="none",
                        help="add a rank-8 LoRA as openvino-genai's dynamic (state) or static (const) mode does")
    args = parser.parse_args()
    folders = args.folders
    if not folders:
        from bench.artifacts import bench_sources, ensure_artifacts

        art = ensure_artifacts(bench_sources())
        folders = [art.ir("base_fp16"), art.ir("base_int8")]
    print(f"CPU: {ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')}, "
          f"{ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}")
    for folder in folders:
        print(profile(folder, args.tokens, args.threads, args.lora))


if __name__ == "__main__":
    main()

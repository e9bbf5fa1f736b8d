"""What each build stage costs (wall time, peak memory) and what the next one will need, checked before it starts."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from tasks.errors import PipelineError

GB = 1e9
MEMORY_LIMIT_ENV = "LORA_MEMORY_LIMIT_GB"  # what a build may use, when less than the machine has free
_SAMPLE_S = 0.1
# Bytes per element of the safetensors header's dtypes.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class Stage:
    name: str
    seconds: float
    peak_rss_gb: float  # this process and its children, sampled every 0.1 s during the stage
    estimate_gb: float | None = None  # what the guard expected it to need, when it checked
    # Of which not file-backed: memory-mapped weights (safetensors, an IR's .bin) count in RSS, but the
    # kernel can drop them under pressure; anonymous memory is what an out-of-memory kill is about.
    peak_anon_gb: float | None = None


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """RSS and anonymous (RSS less file-backed and shared) bytes of `process` and all its descendants."""
    rss = anon = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            info = p.memory_info()
        except psutil.Error:  # a child that ended between listing and reading
            continue
        rss += info.rss
        anon += info.rss - getattr(info, "shared", 0)
    return rss, anon


def tree_rss(process: psutil.Process) -> int:
    """The summed RSS of `process` and all its descendants (a flow's Prefect server, an engine's children)."""
    return tree_memory(process)[0]


class StageMeter:
    """Wall time and peak RSS of each stage of a run; `done(name)` closes a stage and starts the next."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._peak, self._peak_anon = tree_memory(self._process)
        self._start = time.monotonic()
        self._estimate: float | None = None
        self.stages: list[Stage] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="stage-meter", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_S):
            rss, anon = tree_memory(self._process)
            with self._lock:
                self._peak, self._peak_anon = max(self._peak, rss), max(self._peak_anon, anon)

    def expect(self, needed_bytes: float) -> None:
        """What the running stage was estimated to need, kept beside what it used."""
        self._estimate = needed_bytes

    def done(self, name: str) -> Stage:
        rss, anon = tree_memory(self._process)
        with self._lock:
            stage = Stage(
                name,
                round(time.monotonic() - self._start, 2),
                round(max(self._peak, rss) / GB, 3),
                None if self._estimate is None else round(self._estimate / GB, 3),
                round(max(self._peak_anon, anon) / GB, 3),
            )
            self._peak, self._peak_anon, self._start, self._estimate = rss, anon, time.monotonic(), None
        self.stages.append(stage)
        return stage

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.stages]

    def markdown(self, title: str) -> str:
        lines = [
            f"# {title}",
            "",
            "| stage | wall time | peak memory (RSS) | of which not file-backed | estimated need |",
            "|---|---|---|---|---|",
        ]
        for s in self.stages:
            estimate = "-" if s.estimate_gb is None else f"{s.estimate_gb:.2f} GB"
            memory = f"{s.peak_rss_gb:.2f} GB | {s.peak_anon_gb:.2f} GB"
            lines.append(f"| {s.name} | {s.seconds:.1f} s | {memory} | {estimate} |")
        return "\n".join(lines) + "\n"


def available_bytes() -> float:
    """Memory a build may still take: what the OS calls available, capped by LORA_MEMORY_LIMIT_GB less what we hold."""
    free = float(psutil.virtual_memory().available)
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if limit:
        free = min(free, float(limit) * GB - tree_rss(psutil.Process()))
    return max(free, 0.0)


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.0f} MB"


def require_memory(stage: str, needed: float, meter: StageMeter | None = None) -> None:
    """Fail before `stage` starts when it needs more memory than there is, rather than be OOM-killed halfway."""
    if meter is not None:
        meter.expect(needed)
    free = available_bytes()
    if needed > free:
        limit = os.environ.get(MEMORY_LIMIT_ENV)
        raise PipelineError(
            f"{stage} needs about {_size(needed)}, {_size(free)} available"
            + (f" (under {MEMORY_LIMIT_ENV}={limit})" if limit else "")
            + ": free memory, use a machine with more, or a smaller weight format"
        )


@dataclass(frozen=True)
class WeightsSize:
    parameters: int
    bytes_on_disk: int  # in the checkpoint's own dtypes
    largest_tensor: int  # elements of the largest tensor


def weights_size(folder: Path, stem: str = "model") -> WeightsSize:
    """Parameters and bytes of `folder`'s `stem*.safetensors`, from their headers only (nothing is loaded)."""
    from tasks.stream_merge import safetensors_header

    params = nbytes = largest = 0
    for f in sorted(folder.glob(f"{stem}*.safetensors")):
        for name, meta in safetensors_header(f)[1].items():
            if name == "__metadata__":
                continue
            n = 1
            for d in meta["shape"]:
                n *= d
            params += n
            largest = max(largest, n)
            nbytes += n * _DTYPE_BYTES.get(meta["dtype"], 4)
    return WeightsSize(params, nbytes, largest)


# What the export child holds that the kernel cannot drop (tasks/export.py): the weights stay memory-mapped
# from the checkpoint (converted on disk first when their dtype changes), OpenVINO's constants share them;
# NNCF then holds the compressed weights. Measured (issue 17, openvino 2026.4, optimum-intel 2.2): 7B
# shape fp16 1.13 GB, int8 7.32 GB; 1.7B shape fp16 0.92 GB, int8 2.33 GB, int4 1.66 GB.
EXPORT_BASE_BYTES = 1.5 * GB
EXPORT_BYTES_PER_PARAMETER = {"fp32": 0.0, "fp16": 0.0, "int8": 1.0, "int4": 0.5}


def export_needs(size: WeightsSize, weight_format: str) -> float:
    return EXPORT_BASE_BYTES + size.parameters * EXPORT_BYTES_PER_PARAMETER[weight_format]


def compiled_bytes_per_parameter(weight_format: str) -> float:
    """Memory of its own (anonymous) OpenVINO's CPU plugin holds for a compiled LLM IR, per parameter.

    The plugin keeps f16 and int8 weights compressed and decompresses them as it computes, even for
    f32 compute on an AVX2 CPU (the weights-decompression FullyConnected, for models it classes as
    LLMs: stateful or paged attention). Measured with openvino 2026.4 on 7B-shaped layers: fp16 1.93,
    int8 1.01 bytes a parameter. The IR's .bin is memory-mapped besides (as many bytes again), which
    the kernel can reclaim and which is not counted here. Layers of width 1024 or less get a second
    packed copy of their weights: small models, for which the guard's margin is ample.
    """
    if weight_format == "fp32":
        return 4.0
    if weight_format == "fp16":
        return 2.0
    return {"int8": 1.0, "int4": 0.6}[weight_format]


def validate_needs(size: WeightsSize, weight_format: str, reference: float) -> float:
    """The larger of the compiled IR and the torch reference (`reference` bytes): validation holds one at a time.

    15% for activations and the runtime (measured on a 1.6 B bf16 model with the whole-model
    reference: 11.2 GB, estimated 11.3 GB).
    """
    compiled = size.parameters * compiled_bytes_per_parameter(weight_format)
    return max(compiled, reference) * 1.15


def whole_model_needs(size: WeightsSize) -> float:
    """A model loaded whole in f32 by transformers: its f32 copy beside the checkpoint it was read from."""
    return size.parameters * 4.0 + size.bytes_on_disk

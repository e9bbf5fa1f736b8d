"""Export a Hugging Face model folder to OpenVINO IR with tokenizer IRs, compressing weights with NNCF.

The export runs in a child process (`python -m tasks.export`): its memory goes back to the OS when
it ends, an out-of-memory kill takes the child and the build reports it, and the child dies with
its parent. What the export holds (measured with bench/large_model.py's Llama-2-7B-shaped model):

- optimum loads the checkpoint with transformers in the dtype it exports (fp16 for fp16). In the
  checkpoint's own dtype the weights stay memory-mapped from the safetensors files and OpenVINO's
  constants share that memory: file-backed pages, which the kernel can drop, so the anonymous
  memory is ~1.1 GB whatever the size (7B fp16: 14 GB RSS of which 13 GB mapped). In another
  dtype (a bf16 checkpoint exported to fp16) transformers copies every weight: 2 bytes a parameter
  of anonymous memory. Such a checkpoint is converted on disk first, one tensor at a time, into the
  scratch folder (the same values, torch's rounding), and exported from that copy.
- int8/int4: the float IR is written first, then NNCF compresses it read back from disk (as
  optimum-cli does): the compressed weights are anonymous memory, 1 byte a parameter for int8
  (7B int8: 7.3 GB anonymous, 18.5 GB RSS with the mapped fp16 IR).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import task

from tasks import errors
from tasks.errors import PipelineError, SourceError
from tasks.logs import heartbeat, step_logger
from tasks.workdir import Step, atomic_output

WeightFormat = Literal["fp32", "fp16", "int8", "int4"]
TargetDevice = Literal["CPU", "GPU", "NPU"]
WEIGHT_FORMATS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
# As in OVMS's export_model.py: fp16 for CPU, int8 where the device computes int8 well.
DEFAULT_WEIGHT_FORMAT: dict[str, WeightFormat] = {"CPU": "fp16", "GPU": "int8", "NPU": "int4"}
# int4 groups must divide every input width: 32 divides the tiny model's (128, 352) and SmolLM2's (576, 1536).
INT4_GROUP_SIZE = 32
# Below this much free space, a failed export is reported as a full disk (the IR of a 135 M model is 270 MB).
LOW_DISK_BYTES = 64 << 20
# Inside the output folder while the export runs (removed before it returns): the checkpoint converted to
# the dtype the export loads it in, NNCF's temporary IR (TMPDIR: on the output's disk, never a RAM /tmp)
# and the child's error report.
SCRATCH = ".export-scratch"
ROOT = Path(__file__).resolve().parents[1]
# The dtype (safetensors' name) main_export loads a 16-bit checkpoint in for a float format.
_LOAD_DTYPE = {"fp16": "F16", "fp32": "F32"}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Weight formats a converted copy leaves out (transformers would load them instead of safetensors, or not at all).
_OTHER_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    weight_format: WeightFormat  # read back from the IR, not the one asked for
    constant_types: dict[str, int]  # element type -> number of weight constants of that type


def resolve_weight_format(weight_format: str | None, target_device: str) -> WeightFormat:
    """The asked-for format, or the target device's default; a bad value raises naming it."""
    if target_device not in DEFAULT_WEIGHT_FORMAT:
        raise ValueError(f"target_device must be one of {sorted(DEFAULT_WEIGHT_FORMAT)}, got {target_device!r}")
    fmt = weight_format or DEFAULT_WEIGHT_FORMAT[target_device]
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {fmt!r}")
    return fmt  # type: ignore[return-value]


def read_weight_format(model_xml: Path) -> tuple[WeightFormat, dict[str, int]]:
    """Tell the precision of an IR from the element types of its weight constants."""
    import openvino as ov

    model = ov.Core().read_model(model_xml)
    types: Counter[str] = Counter()
    for op in model.get_ordered_ops():
        # Weights are constants of rank >= 2; scalars and shape constants say nothing about precision.
        if op.get_type_name() == "Constant" and len(op.get_output_partial_shape(0)) >= 2:
            types[op.get_output_element_type(0).get_type_name()] += 1
    if types["u4"] or types["i4"]:
        fmt: WeightFormat = "int4"
    elif types["u8"] or types["i8"]:
        fmt = "int8"
    elif types["f16"]:
        fmt = "fp16"
    else:
        fmt = "fp32"
    return fmt, dict(types)


def _ov_config(weight_format: WeightFormat) -> Any:
    from optimum.intel import OVConfig, OVWeightQuantizationConfig

    if weight_format in ("fp32", "fp16"):
        return OVConfig(dtype=weight_format)
    if weight_format == "int8":
        return OVConfig(quantization_config=OVWeightQuantizationConfig(bits=8))
    return OVConfig(quantization_config=OVWeightQuantizationConfig(bits=4, group_size=INT4_GROUP_SIZE, ratio=1.0))


def _safetensors_files(model_dir: Path) -> tuple[tuple[str, ...], str | None]:
    """The weight files transformers loads from `model_dir`, and the index; none when they are not safetensors."""
    from tasks.stream_merge import NotStreamable, weight_files

    try:
        return weight_files(model_dir)
    except (NotStreamable, SourceError):  # pickled, or a broken index: main_export reports it as it loads
        return (), None


def _conversion_dtype(model_dir: Path, weight_format: str, trust_remote_code: bool) -> str | None:
    """The safetensors dtype to convert `model_dir`'s float weights to before exporting, or None to export it as is.

    main_export loads a 16-bit checkpoint in fp16 for fp16 and in f32 for fp32, and transformers copies
    every weight whose dtype changes. Converted on disk beforehand, the weights load memory-mapped with
    the same values (torch's rounding either way). Not done where transformers would not convert them
    all to that dtype (modules it keeps in f32) or where the weights are not plain safetensors files.
    """
    from tasks.stream_merge import safetensors_header

    if weight_format not in _LOAD_DTYPE or not (model_dir / "config.json").is_file():
        return None  # int8/int4: loaded in the checkpoint's own dtype (memory-mapped), compressed from the IR
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    stated = config.get("dtype", config.get("torch_dtype"))
    if stated not in ("float16", "bfloat16"):
        return None  # main_export loads f32 (and unstated) checkpoints as they are, and compresses when saving
    target = _LOAD_DTYPE[weight_format]
    files, _ = _safetensors_files(model_dir)
    if not files:
        return None
    dtypes = {
        meta["dtype"]
        for f in files
        for name, meta in safetensors_header(model_dir / f)[1].items()
        if name != "__metadata__"
    }
    if not dtypes & (set(_FLOAT_DTYPES) - {target}) or "auto_map" in config:
        return None  # nothing to convert; or remote code, whose loading we do not second-guess
    from tasks.stream_merge import NotStreamable, meta_skeleton

    try:
        skeleton = meta_skeleton(model_dir, trust_remote_code)
    except NotStreamable:  # main_export reports whatever stops transformers here
        return None
    if skeleton._keep_in_fp32_modules or skeleton._keep_in_fp32_modules_strict:
        return None
    return target


def convert_checkpoint(src: Path, dest: Path, dtype: str) -> None:
    """Copy `src` into `dest` with every float safetensors weight converted to `dtype`, one tensor in memory at a time.

    The other files are copied as they are (config, tokenizer, generation config); shard names and the
    index stay the same. The values are torch's `.to(dtype)` of each tensor, as transformers converts them.
    """
    import torch
    from safetensors import safe_open

    from tasks.stream_merge import safetensors_header

    to_torch = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    dest.mkdir(parents=True, exist_ok=True)
    files, index = _safetensors_files(src)
    total = 0
    for file in files:
        _, header = safetensors_header(src / file)
        names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
        out_header: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
        offset = 0
        for name in names:
            meta = header[name]
            new = dtype if meta["dtype"] in _FLOAT_DTYPES else meta["dtype"]
            n = meta["data_offsets"][1] - meta["data_offsets"][0]
            if new != meta["dtype"]:
                n = n // to_torch[meta["dtype"]].itemsize * to_torch[new].itemsize
            out_header[name] = {"dtype": new, "shape": meta["shape"], "data_offsets": [offset, offset + n]}
            offset += n
        total += offset
        raw_header = json.dumps(out_header, separators=(",", ":")).encode()
        raw_header += b" " * (-len(raw_header) % 8)
        with open(dest / file, "wb") as out:
            out.write(len(raw_header).to_bytes(8, "little"))
            out.write(raw_header)
            for name in names:
                # opened per tensor: safe_open's mapping keeps what it read resident while it is open
                with safe_open(src / file, framework="pt") as st:
                    tensor = st.get_tensor(name)
                if out_header[name]["dtype"] != header[name]["dtype"]:
                    tensor = tensor.to(to_torch[dtype])
                out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del tensor
    if index:
        data = json.loads((src / index).read_text(encoding="utf-8"))
        data.setdefault("metadata", {})["total_size"] = total
        (dest / index).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_OTHER_WEIGHTS) and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)


def _export_here(model_dir: Path, out_dir: Path, weight_format: WeightFormat, trust_remote_code: bool) -> None:
    """optimum-intel's main_export with tokenizer conversion, then NNCF on the IR read back (as optimum-cli does)."""
    from optimum.exporters.openvino import main_export

    scratch = out_dir / SCRATCH
    ov_config = _ov_config(weight_format)
    source = model_dir
    dtype = _conversion_dtype(model_dir, weight_format, trust_remote_code)
    if dtype:
        t = time.monotonic()
        source = scratch / "source"
        convert_checkpoint(model_dir, source, dtype)
        print(f"converted {model_dir} to {dtype} in {source} in {time.monotonic() - t:.1f} s", file=sys.stderr)
    main_export(
        str(source),
        output=out_dir,
        task="text-generation-with-past",
        ov_config=ov_config,
        convert_tokenizer=True,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
    )
    if source != model_dir:
        shutil.rmtree(source)
    if ov_config.quantization_config:
        from huggingface_hub.constants import HF_HUB_CACHE
        from optimum.exporters.openvino.__main__ import _main_quantize

        _main_quantize(
            str(model_dir),
            task="text-generation-with-past",
            library_name="transformers",
            quantization_config=ov_config.quantization_config,
            output=out_dir,
            cache_dir=HF_HUB_CACHE,  # unused: the model is a local folder
            trust_remote_code=trust_remote_code,
        )


def _export_in_child(model_dir: Path, out_dir: Path, weight_format: WeightFormat, trust_remote_code: bool) -> float:
    """`_export_here` in a child process; returns its peak RSS in bytes, raises its failure here.

    The child reports its exception through a pipe (a full disk leaves no room for a file).
    """
    scratch = out_dir / SCRATCH
    scratch.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "tasks.export", str(model_dir.absolute()), str(out_dir.absolute()), weight_format]
    cmd += ["--error-fd", str(write_end), "--parent", str(os.getpid())]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    env = dict(os.environ, TMPDIR=str(scratch.absolute()))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, pass_fds=(write_end,))
    finally:
        os.close(write_end)
    report = b""
    try:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        os.set_blocking(read_end, False)  # what the child wrote before it ended; never wait on a grandchild
        with contextlib.suppress(BlockingIOError), open(read_end, "rb", closefd=False) as pipe:
            report = pipe.read() or b""
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(read_end)
    peak = usage.ru_maxrss * 1024.0
    if code == 0:
        return peak
    with contextlib.suppress(ValueError):
        error = json.loads(report)
        if error.get("errno"):
            raise OSError(error["errno"], error["message"], error.get("filename"))
        pipeline_error = getattr(errors, error["type"], None)
        if isinstance(pipeline_error, type) and issubclass(pipeline_error, PipelineError):
            raise pipeline_error(error["message"])
        raise RuntimeError(f"{error['type']}: {error['message']}")
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        oom = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        raise RuntimeError(f"the export process was killed by {name}{oom} at {peak / 1e9:.1f} GB")
    raise RuntimeError(f"the export process failed with exit code {code}")


def export_openvino(
    model_dir: Path,
    out_dir: Path,
    weight_format: WeightFormat,
    *,
    trust_remote_code: bool = False,
) -> ExportResult:
    """optimum-intel's main_export with tokenizer conversion; NNCF compresses int8 and int4 weights.

    Runs in a child process (see the module's docstring); `out_dir` is created.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    log = step_logger(__name__)  # Prefect's run logger inside a run, so progress shows in the UI
    log.info("exporting %s to OpenVINO IR (%s)", model_dir, weight_format)
    try:
        with heartbeat(log, f"exporting {model_dir.name} to OpenVINO IR ({weight_format})"):
            peak = _export_in_child(model_dir, out_dir, weight_format, trust_remote_code)
    finally:
        shutil.rmtree(out_dir / SCRATCH, ignore_errors=True)
    log.info("the export process peaked at %.2f GB RSS (memory-mapped weights included)", peak / 1e9)
    for required in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        if not (out_dir / required).is_file():
            raise RuntimeError(f"export of {model_dir} wrote no {required} in {out_dir}")
    fmt, types = read_weight_format(out_dir / "openvino_model.xml")
    if fmt != weight_format:
        raise RuntimeError(f"asked for {weight_format} weights but the IR holds {fmt} ({types})")
    log.info("exported %s: %s weights %s", out_dir, fmt, types)
    return ExportResult(out_dir, fmt, types)


def export_step(
    model_dir: Path, out_dir: Path, weight_format: WeightFormat, *, trust_remote_code: bool = False
) -> ExportResult:
    """export_openvino into `out_dir` whole or not at all; an `out_dir` left by an earlier run is reused."""
    log = step_logger(__name__)
    if out_dir.is_dir():
        fmt, types = read_weight_format(out_dir / "openvino_model.xml")
        log.info("IR already in %s (%s)", out_dir, fmt)
        return ExportResult(out_dir, fmt, types)
    try:
        with atomic_output(out_dir) as tmp:
            result = export_openvino(model_dir, tmp, weight_format, trust_remote_code=trust_remote_code)
    except (OSError, RuntimeError) as e:
        # OpenVINO's serializer reports a full disk as "basic_ios::clear: iostream error": say what it was.
        free = shutil.disk_usage(out_dir.parent).free
        if free < LOW_DISK_BYTES or getattr(e, "errno", None) == errno.ENOSPC:
            raise PipelineError(
                f"{os.strerror(errno.ENOSPC)} for {out_dir.parent} during export ({free >> 20} MiB free): {e}"
            ) from e
        raise
    return ExportResult(out_dir, result.weight_format, result.constant_types)


# What the IR depends on beyond the model folder and the format: the converting and compressing tools and
# this module (with the checkpoint helpers it borrows). The flow names the folder with EXPORT.folder.
EXPORT = Step(
    "ir",
    tools=("openvino", "openvino-tokenizers", "optimum-intel", "optimum", "nncf", "transformers", "tokenizers",
           "safetensors", "torch"),
    modules=("tasks.export", "tasks.stream_merge"),
)
export = task(
    name="export", task_run_name="export-{weight_format}", cache_key_fn=EXPORT.cache_key, persist_result=True
)(export_step)


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this process when its parent dies (a killed build leaves no export running)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _child_main() -> None:
    """The export process: `python -m tasks.export MODEL_DIR OUT_DIR FORMAT --error-fd FD [--trust-remote-code]`.

    On failure it writes the exception (type, message, errno) as JSON to FD, for the parent to raise.
    """
    parser = argparse.ArgumentParser(prog="python -m tasks.export")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("weight_format", choices=WEIGHT_FORMATS)
    parser.add_argument("--error-fd", type=int, help="a pipe to write the failure to")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--parent", type=int, help="the process to die with")
    args = parser.parse_args()
    if args.parent:
        _die_with_parent(args.parent)
    if args.error_fd is not None:
        os.set_inheritable(args.error_fd, False)
    try:
        _export_here(args.model_dir, args.out_dir, args.weight_format, args.trust_remote_code)
    except BaseException as e:
        report: dict[str, Any] = {"type": type(e).__name__, "message": str(e)[:8000]}
        if isinstance(e, OSError) and e.errno:
            report.update(errno=e.errno, message=e.strerror or str(e), filename=e.filename and str(e.filename))
        if args.error_fd is not None:
            with contextlib.suppress(OSError):
                os.write(args.error_fd, json.dumps(report).encode())
        raise


if __name__ == "__main__":
    _child_main()

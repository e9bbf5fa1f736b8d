"""Export a Hugging Face model folder to OpenVINO IR with tokenizer IRs, compressing weights with NNCF."""

from __future__ import annotations

import errno
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import task

from tasks.errors import PipelineError
from tasks.logs import heartbeat, step_logger
from tasks.workdir import atomic_output, output_cache_key

WeightFormat = Literal["fp32", "fp16", "int8", "int4"]
TargetDevice = Literal["CPU", "GPU", "NPU"]
WEIGHT_FORMATS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
# As in OVMS's export_model.py: fp16 for CPU, int8 where the device computes int8 well.
DEFAULT_WEIGHT_FORMAT: dict[str, WeightFormat] = {"CPU": "fp16", "GPU": "int8", "NPU": "int4"}
# int4 groups must divide every input width: 32 divides the tiny model's (128, 352) and SmolLM2's (576, 1536).
INT4_GROUP_SIZE = 32
# Below this much free space, a failed export is reported as a full disk (the IR of a 135 M model is 270 MB).
LOW_DISK_BYTES = 64 << 20


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


def export_openvino(
    model_dir: Path,
    out_dir: Path,
    weight_format: WeightFormat,
    *,
    trust_remote_code: bool = False,
) -> ExportResult:
    """optimum-intel's main_export with tokenizer conversion; NNCF compresses int8 and int4 weights."""
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig, OVWeightQuantizationConfig

    if weight_format in ("fp32", "fp16"):
        ov_config = OVConfig(dtype=weight_format)
    elif weight_format == "int8":
        ov_config = OVConfig(quantization_config=OVWeightQuantizationConfig(bits=8))
    else:
        ov_config = OVConfig(
            quantization_config=OVWeightQuantizationConfig(bits=4, group_size=INT4_GROUP_SIZE, ratio=1.0)
        )
    log = step_logger(__name__)  # Prefect's run logger inside a run, so progress shows in the UI
    log.info("exporting %s to OpenVINO IR (%s)", model_dir, weight_format)
    with heartbeat(log, f"exporting {model_dir.name} to OpenVINO IR"):
        main_export(
            str(model_dir),
            output=out_dir,
            task="text-generation-with-past",
            ov_config=ov_config,
            convert_tokenizer=True,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
    if ov_config.quantization_config:
        # As optimum-cli does: main_export writes the float IR, then NNCF compresses it in place.
        from huggingface_hub.constants import HF_HUB_CACHE
        from optimum.exporters.openvino.__main__ import _main_quantize

        with heartbeat(log, f"compressing the weights to {weight_format} with NNCF"):
            _main_quantize(
                str(model_dir),
                task="text-generation-with-past",
                library_name="transformers",
                quantization_config=ov_config.quantization_config,
                output=out_dir,
                cache_dir=HF_HUB_CACHE,  # unused: the model is a local folder
                trust_remote_code=trust_remote_code,
            )
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


# Cached on `out_dir`, whose name the flow derives from the resolved revisions, file hashes and format.
export = task(
    name="export", task_run_name="export-{weight_format}", cache_key_fn=output_cache_key, persist_result=True
)(export_step)

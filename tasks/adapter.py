"""Prepare a runtime adapter for serving: check it fits its base, and stage its safetensors weights and config."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from modelrepo import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tasks.adapter_fit import check_adapter_fits
from tasks.errors import SourceError
from tasks.logs import step_logger
from tasks.workdir import atomic_output


def stage_adapter(adapter_dir: Path, out_dir: Path, *, allow_pickle: bool = False) -> Path:
    """The two files openvino-genai and peft need, pickled weights converted to safetensors (--allow-pickle)."""
    log = step_logger(__name__)
    if out_dir.is_dir():
        return out_dir
    with atomic_output(out_dir) as tmp:
        shutil.copy2(adapter_dir / ADAPTER_CONFIG, tmp)
        weights = adapter_dir / ADAPTER_WEIGHTS
        if weights.is_file():
            shutil.copy2(weights, tmp)
        elif allow_pickle and (adapter_dir / "adapter_model.bin").is_file():
            import torch
            from safetensors.torch import save_file

            log.info("converting %s/adapter_model.bin to safetensors", adapter_dir)
            state = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / ADAPTER_WEIGHTS)
        else:
            raise SourceError(
                f"adapter {adapter_dir} has no {ADAPTER_WEIGHTS} (--allow-pickle converts a .bin)"
            )
    return out_dir


check_fit = task(name="check-fit", cache_policy=NO_CACHE)(check_adapter_fits)
stage = task(name="stage-adapter", cache_policy=NO_CACHE)(stage_adapter)

"""The candidate run as the server runs it: openvino-genai's pipeline and the IR's infer request, pinned numerics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelrepo.numerics import Numerics, engine_properties


def ir_request(model_xml: Path, numerics: Numerics) -> Any:
    """An infer request on the IR compiled with the pinned numerics: full logits in one forward pass."""
    import openvino as ov

    return ov.Core().compile_model(str(model_xml), "CPU", engine_properties(numerics)).create_infer_request()


def ir_logits(request: Any, ids: list[int], start: int) -> np.ndarray:
    """(len(ids) - start, V) logits of a stateful optimum IR, teacher-forced in one forward pass."""
    names = {i.get_any_name() for i in request.model_inputs}
    n = len(ids)
    feed = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64)}
    if "position_ids" in names:
        feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
    if "beam_idx" in names:
        feed["beam_idx"] = np.zeros(1, dtype=np.int32)
    request.reset_state()
    request.infer(feed)
    return request.get_tensor("logits").data[0, start - 1 : n - 1].astype(np.float32)


def genai_pipeline(folder: Path, numerics: Numerics, adapters: Any = None) -> Any:
    """openvino-genai's ContinuousBatchingPipeline as the server builds it: pinned numerics, no prefix cache.

    Prefix caching stays off: its KV blocks are not keyed by adapter, so a base request after an
    adapter request on the same prompt would reuse the adapter's cached prefix.
    """
    import openvino_genai

    scheduler = openvino_genai.SchedulerConfig()
    scheduler.enable_prefix_caching = False
    properties: dict[str, Any] = dict(engine_properties(numerics))
    if adapters is not None:
        properties["adapters"] = adapters
    return openvino_genai.ContinuousBatchingPipeline(str(folder), scheduler, "CPU", properties)


def genai_generate(pipe: Any, prompts: Sequence[Sequence[int]], config: Any) -> list[Any]:
    """One `config` for every prompt (token ids, no chat template), all in one continuously batched call."""
    import openvino as ov

    inputs = [ov.Tensor(np.array([list(ids)], dtype=np.int64)) for ids in prompts]
    return list(pipe.generate(inputs, [config] * len(inputs)))


def genai_greedy(
    pipe: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, adapters: Any = None
) -> list[list[int]]:
    """The pipeline's greedy continuation of each prompt, batched."""
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.do_sample = max_new_tokens, False
    if adapters is not None:
        config.adapters = adapters
    return [list(r.m_generation_ids[0]) for r in genai_generate(pipe, prompts, config)]

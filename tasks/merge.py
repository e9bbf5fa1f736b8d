"""Merge LoRA adapters into their base model, in order, and save a safetensors HF folder.

Streamed tensor by tensor from the base's safetensors shards when it can be (tasks.stream_merge: the
checkpoint's dtype, memory of one weight), else with peft's merge_and_unload on the base in float32.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task

from tasks.adapter_fit import check_adapter_fits, tensor_shapes
from tasks.loaders import load_base, load_tokenizer
from tasks.logs import heartbeat, step_logger
from tasks.resources import require_memory, weights_size
from tasks.stream_merge import NotStreamable, plan_stream_merge, stream_merge
from tasks.workdir import Step, atomic_output


def merge_adapters(
    base_dir: Path,
    adapter_dirs: list[Path],
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Check every adapter fits, apply each in turn, save the model and tokenizer.

    Streamed (tasks.stream_merge) when the sources allow it, else peft's merge_and_unload on the base in
    float32; the log says which ran, and why peft's.
    """
    from peft import PeftModel

    log = step_logger(__name__)
    if out_dir.is_dir():
        log.info("merged model already in %s", out_dir)
        return out_dir
    tokenizer = load_tokenizer(base_dir, tokenizer_dir, trust_remote_code=trust_remote_code)
    shapes = tensor_shapes(base_dir, "model", allow_pickle=allow_pickle)
    for adapter in adapter_dirs:
        fit = check_adapter_fits(
            base_dir, adapter, vocab_size=len(tokenizer), allow_pickle=allow_pickle, base_shapes=shapes
        )
        log.info("adapter %s fits: rank %d, scale %g, %d modules", adapter, fit.rank, fit.scale, fit.modules)
    size = weights_size(base_dir)
    try:
        plan = plan_stream_merge(base_dir, adapter_dirs, vocab_size=len(tokenizer), trust_remote_code=trust_remote_code)
    except NotStreamable as why:
        log.info("peft merge: %s", why)
        # The base in f32, and merge_and_unload's copy of each merged weight plus what save_pretrained holds.
        require_memory(f"merging {len(adapter_dirs)} adapters with peft in f32", size.parameters * 4 * 2)
    else:
        # One weight at a time: its f32 copy, the f32 delta and the rounded result.
        require_memory("merging the adapters tensor by tensor", size.largest_tensor * 4 * 3)
        start = time.monotonic()
        with atomic_output(out_dir) as tmp, heartbeat(log, f"streaming the merge into {out_dir}"):
            changed = stream_merge(plan, tmp)
            tokenizer.save_pretrained(tmp)
        log.info("streamed merge of %d tensors in %.1f s", changed, time.monotonic() - start)
        log.info("merged model saved in %s", out_dir)
        return out_dir
    with heartbeat(log, f"loading base {base_dir.name}"):
        model = load_base(base_dir, tokenizer, trust_remote_code=trust_remote_code, progress=log.info)
    for i, adapter in enumerate(adapter_dirs, 1):
        with heartbeat(log, f"merging adapter {i}/{len(adapter_dirs)} {adapter.name}"):
            # safe_merge checks the merged weights are finite before keeping them.
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload(safe_merge=True)
    with atomic_output(out_dir) as tmp, heartbeat(log, f"saving the merged model to {out_dir}"):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log.info("merged model saved in %s", out_dir)
    return out_dir


# What the merged weights and tokenizer depend on beyond the sources: the flow names the folder with
# MERGE.folder and the task's cache key holds the same, so an upgraded peft merges again.
MERGE = Step("merged", tools=("transformers", "tokenizers", "safetensors", "peft", "torch"),
             modules=("tasks.merge", "tasks.stream_merge", "tasks.adapter_fit", "tasks.loaders"))
merge = task(name="merge", task_run_name="merge", cache_key_fn=MERGE.cache_key, persist_result=True)(merge_adapters)

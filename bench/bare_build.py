"""The build baseline: the bare library calls the build_model flow wraps (merge, export, tokenizer conversion).

    python -m bench.bare_build --base DIR --adapter DIR --out DIR

No checks, no validation, no Prefect, no publishing: the least a user could do by hand for the
same fp16 IR. Prints JSON with the time of each call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_build", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    times: dict[str, float] = {}
    t = time.perf_counter()

    import openvino as ov
    import torch
    from openvino_tokenizers import convert_tokenizer
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    times["imports"] = time.perf_counter() - t
    t = time.perf_counter()
    merged = args.out / "merged"
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model.save_pretrained(merged, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    tokenizer.save_pretrained(merged)
    del model
    times["merge"] = time.perf_counter() - t

    t = time.perf_counter()
    ir = args.out / "ir"
    main_export(str(merged), output=ir, task="text-generation-with-past", ov_config=OVConfig(dtype="fp16"),
                convert_tokenizer=False, local_files_only=True)
    times["export"] = time.perf_counter() - t

    t = time.perf_counter()
    ov_tok, ov_detok = convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(ov_tok, ir / "openvino_tokenizer.xml")
    ov.save_model(ov_detok, ir / "openvino_detokenizer.xml")
    times["tokenizer"] = time.perf_counter() - t
    json.dump({k: round(v, 2) for k, v in times.items()}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The build_model flow: base model + LoRA adapters -> merged, exported, validated, published.

    python -m flows.build_model --source-model demo-sources/base --adapter demo-sources/adapters/sql \\
        --model-name merged_model --repository models|s3://bucket/models [--weight-format fp16 | --target-device GPU] \\
        [--inference-precision auto|f32|bf16 --kv-cache-precision auto|u8|f32 ...]
    python -m flows.build_model --source-model demo-sources/base --model-name base_model --repository models

Sources are local folders or hub ids, pinned with @revision (org/name@v1.0 or @<commit sha>).
Re-running with the same inputs reuses finished steps (Prefect caching keyed on the resolved
revisions and file hashes, the options, the versions of the tools each step calls and the step's
own code) and publishes nothing new while an identical build is live, unless --overwrite is given.
The version pins its numerics (compute and KV-cache precision, dynamic quantization): validated
with them, recorded in the manifest and graph.pbtxt, applied by servers.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run

import modelrepo
from flows.cli import run
from modelrepo.numerics import INFERENCE_PRECISIONS, KV_CACHE_PRECISIONS, Numerics, resolve
from tasks.errors import SourceError
from tasks.export import EXPORT, ExportResult, TargetDevice, WeightFormat, export, resolve_weight_format
from tasks.logs import Progress, step_logger
from tasks.merge import MERGE, merge
from tasks.publish import Published, build_key, make_manifest, publish, up_to_date
from tasks.reference import reference_needs
from tasks.report import DEFAULT_PROMPTS, ValidationReport, require_computable
from tasks.resources import export_needs, require_memory, validate_needs, weights_size
from tasks.sources import Source, fetch_source, resolve_source, snapshot_path
from tasks.validate import validate
from tasks.workdir import default_work_dir, file_digest, fresh_unless_present, tool_versions


def describe_sources(base: Source, adapters: list[tuple[Source, Path]], tokenizer: Source | None) -> dict[str, Any]:
    """The manifest's sources: exact revisions, and a sha256 of every adapter file."""
    return {
        "base": base.describe(),
        "adapters": [s.describe() | {"files": modelrepo.hash_files(p)} for s, p in adapters],
        "tokenizer": tokenizer.describe() if tokenizer else None,
    }


@flow(name="build_model", flow_run_name="build-{model_name}")
def build_model(
    source_model: str,
    model_name: str,
    repository: str | Path,
    adapters: list[str] | None = None,
    tokenizer: str | None = None,
    weight_format: WeightFormat | None = None,
    target_device: TargetDevice = "CPU",
    prompts: Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    retention: int = 3,
    stage: bool = False,
    work_dir: Path | None = None,
    inference_precision: Literal["auto", "f32", "bf16", "f16"] = "auto",
    kv_cache_precision: Literal["auto", "u8", "f16", "bf16", "f32"] = "auto",
    dynamic_quantization_group_size: str = "auto",
) -> Published:
    """Resolve and fetch the sources, merge the adapters in order, export, validate, publish."""
    log = step_logger(__name__)
    modelrepo.check_name(model_name)
    fmt = resolve_weight_format(weight_format, target_device)
    numerics = resolve(inference_precision, kv_cache_precision, str(dynamic_quantization_group_size))
    # Before any work: a CPU that cannot compute the pinned precision cannot validate it.
    require_computable(numerics)
    log.info("numerics pinned for %s: %s", model_name, numerics)
    adapters = adapters or []
    work = work_dir or default_work_dir()
    prompts = Path(prompts or DEFAULT_PROMPTS)
    if not prompts.is_file():
        raise SourceError(f"prompt set {prompts}: no such file")
    flags = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    steps = ["resolve", "fetch", "merge", "export", "validate", "publish"]
    with Progress(f"build {model_name}", steps, key=f"build-stages-{model_name}") as progress:
        sources = _resolve(source_model, adapters, tokenizer, flags)
        inputs = [*sources.pinned, file_digest(prompts), numerics.to_json()]
        key = build_key(inputs, fmt, target_device, tool_versions())
        if not overwrite and (live := up_to_date(repository, model_name, key)):
            log.info(
                "%s is up to date: version %d was built from the same inputs (--overwrite publishes anyway)",
                model_name,
                live.version,
            )
            return Published(model_name, live.version, modelrepo.open_store(repository).locate(live.path), False)
        progress.step("resolve")
        fetched = _fetch(sources)
        progress.step("fetch")
        model_dir = _merge(work, sources, fetched)
        progress.step("merge")
        size = weights_size(model_dir)
        what = f"exporting {model_name} ({size.parameters / 1e9:.2f} B parameters) to {fmt}"
        require_memory(what, export_needs(size, fmt), progress.meter)
        ir = _export(work, sources, model_dir, fmt)
        progress.step("export")
        needs = validate_needs(size, fmt, reference_needs(fetched.base, size))
        require_memory(f"validating {model_name} against its f32 reference", needs, progress.meter)
        report = validate(
            ir.folder,
            fetched.base,
            fetched.adapters,
            prompts,
            ir.weight_format,
            numerics,
            fetched.tokenizer,
            publish_as=model_name,
            trust_remote_code=trust_remote_code,
        )
        progress.step("validate")
        manifest = _manifest(key, sources, fetched, ir, numerics, target_device, report) | {
            "stages": progress.meter.summary()
        }
        kind = "merged" if fetched.adapters else "base"
        markdown = report.markdown(model_name)
        opts = {"target_device": target_device, "retention": retention, "report_markdown": markdown, "stage": stage}
        published = publish(repository, model_name, kind, ir.folder, manifest, **opts)
        progress.step("publish")
        return published


@dataclass(frozen=True)
class _Sources:
    """The build's sources, resolved to exact revisions, and the flags they are read with."""

    base: Source
    adapters: list[Source]
    tokenizer: Source | None
    flags: dict[str, bool]

    @property
    def pinned(self) -> list[Any]:
        """What identifies them: the revisions and the flags (the steps' folders and the build key start here)."""
        tok = self.tokenizer.revision if self.tokenizer else None
        return [self.base.revision, [a.revision for a in self.adapters], tok, self.flags]


@dataclass(frozen=True)
class _Fetched:
    base: Path
    adapters: list[Path]
    tokenizer: Path | None


def _resolve(source_model: str, adapters: list[str], tokenizer: str | None, flags: dict[str, bool]) -> _Sources:
    return _Sources(
        resolve_source(source_model, "base", **flags),
        [resolve_source(a, "adapter", **flags) for a in adapters],
        resolve_source(tokenizer, "tokenizer", **flags) if tokenizer else None,
        flags,
    )


def _fetch(sources: _Sources) -> _Fetched:
    """Each source in a local folder; one already fetched is not fetched again."""
    base, *adapters = [
        fresh_unless_present(fetch_source, snapshot_path(s))(s, **sources.flags)
        for s in [sources.base, *sources.adapters]
    ]
    tok = sources.tokenizer
    tok_dir = fresh_unless_present(fetch_source, snapshot_path(tok))(tok, **sources.flags) if tok else None
    return _Fetched(base, adapters, tok_dir)


def _merge(work: Path, sources: _Sources, fetched: _Fetched) -> Path:
    """The model to export: the base with the adapters merged in order (and the tokenizer given), or the base."""
    if not (fetched.adapters or fetched.tokenizer):
        return fetched.base
    merged = MERGE.folder(work, *sources.pinned)
    merging = fresh_unless_present(merge, merged)
    return merging(fetched.base, fetched.adapters, merged, fetched.tokenizer, **sources.flags)



def _export(work: Path, sources: _Sources, model_dir: Path, fmt: str) -> ExportResult:
    """The model as OpenVINO IR in `fmt`; one exported already is not exported again."""
    # The merged folder's name holds the merge's key: a model merged anew is exported anew.
    ir_dir = EXPORT.folder(work, *sources.pinned, fmt, model_dir.name)
    exporting = fresh_unless_present(export, ir_dir)
    return exporting(model_dir, ir_dir, fmt, trust_remote_code=sources.flags["trust_remote_code"])


def _manifest(
    key: str,
    sources: _Sources,
    fetched: _Fetched,
    ir: ExportResult,
    numerics: Numerics,
    target_device: str,
    report: ValidationReport,
) -> dict[str, Any]:
    """What the version records: how it was built, from what, with which tools, and its validation."""
    return make_manifest(
        key=key,
        sources=describe_sources(
            sources.base, list(zip(sources.adapters, fetched.adapters, strict=True)), sources.tokenizer
        ),
        weight_format=ir.weight_format,
        numerics=numerics,
        constant_types=ir.constant_types,
        target_device=target_device,
        tools=tool_versions(),
        validation=report.summary(),
        flow_run=flow_run.get_id(),
    )

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.build_model", description=__doc__.splitlines()[0])
    p.add_argument("--source-model", required=True, help="base model: hub id[@revision] or local folder")
    p.add_argument(
        "--adapter", dest="adapters", action="append", default=[], help="LoRA adapter, applied in order (repeatable)"
    )
    p.add_argument("--tokenizer", help="tokenizer source, when the adapters use another than the base's")
    p.add_argument(
        "--weight-format",
        choices=["fp32", "fp16", "int8", "int4"],
        help="default: from --target-device (CPU fp16, GPU int8)",
    )
    p.add_argument("--target-device", default="CPU", choices=["CPU", "GPU", "NPU"])
    p.add_argument(
        "--inference-precision",
        default="auto",
        choices=["auto", *INFERENCE_PRECISIONS],
        help="the precision the version is computed in, pinned (auto: f32, or $LORA_INFERENCE_PRECISION)",
    )
    p.add_argument(
        "--kv-cache-precision",
        default="auto",
        choices=["auto", *KV_CACHE_PRECISIONS],
        help="the KV cache's element type, pinned (auto: u8)",
    )
    p.add_argument(
        "--dynamic-quantization-group-size",
        default="auto",
        help="activation quantization group for int8/int4 weights, pinned; 0 turns it off (auto: 32)",
    )
    p.add_argument("--model-name", required=True, help="the served name")
    p.add_argument("--repository", required=True, help="the model repository: a folder, or s3://bucket/prefix")
    p.add_argument("--prompts", type=Path, help=f"validation prompts, JSONL (default {DEFAULT_PROMPTS.name})")
    p.add_argument("--overwrite", action="store_true", help="publish even when an identical build is live")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled (.bin) weights")
    p.add_argument("--trust-remote-code", action="store_true", help="accept custom model code")
    p.add_argument("--retention", type=int, default=3, help="versions kept per name (default 3)")
    p.add_argument(
        "--stage", action="store_true",
        help="publish staged: servers build its engine ahead; `python -m modelrepo promote` makes it live at once",
    )  # fmt: skip
    p.add_argument("--work-dir", type=Path, help="where intermediate builds are cached")
    return run("build_model", build_model, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The publish_adapter flow: a LoRA adapter checked and validated on a published base, served at runtime.

    python -m flows.publish_adapter --adapter demo-sources/adapters/spell --base base_model \\
        --name spell_adapter --repository models --prompts demo/prompts/spell.jsonl

No base rebuild: the adapter is checked against the base's torch weights (the source its manifest
records, or --base-source), validated on the base's IR through openvino-genai with the adapter
applied at runtime (scale lora_alpha / r), and published with the index naming its base and scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

import modelrepo
from flows.cli import run
from modelrepo.numerics import default_numerics, pinned
from tasks.adapter import check_fit, stage
from tasks.errors import PipelineError, SourceError
from tasks.logs import step_logger
from tasks.publish import Published, build_key, live_build, make_manifest, publish, up_to_date
from tasks.report import DEFAULT_PROMPTS, require_computable
from tasks.sources import fetch_source, resolve_source, snapshot_path
from tasks.validate_adapter import validate_adapter
from tasks.workdir import default_work_dir, file_digest, fresh_unless_present, input_key, tool_versions


def served_base(repository: str | Path, base: str) -> tuple[modelrepo.Entry, dict[str, Any]]:
    """The live entry and manifest of `base`, which must be a base model (no adapters merged into it)."""
    modelrepo.check_name(base)
    live = live_build(repository, base)
    if live is None:
        served = sorted(modelrepo.read_index(repository).entries)
        raise PipelineError(f"base {base!r} is not served in {repository}; served: {served or 'none'}")
    entry, manifest = live
    if entry.kind != "base":
        raise PipelineError(f"{base!r} is a {entry.kind} model: runtime adapters apply to a base model only")
    return entry, manifest


@flow(name="publish_adapter", flow_run_name="publish-adapter-{name}")
def publish_adapter(
    adapter: str,
    base: str,
    name: str,
    repository: str | Path,
    prompts: Path | None = None,
    base_source: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    retention: int = 3,
    work_dir: Path | None = None,
) -> Published:
    """Resolve the adapter, check it fits the served base, validate it at runtime on the base's IR, publish."""
    log = step_logger(__name__)
    modelrepo.check_name(name)
    entry, base_manifest = served_base(repository, base)
    recorded = (base_manifest.get("sources") or {}).get("base") or {}
    spec = base_source or recorded.get("spec")
    if not spec:
        raise PipelineError(f"the manifest of {entry.path} records no base source: pass --base-source")
    work = work_dir or default_work_dir()
    prompts = Path(prompts or DEFAULT_PROMPTS)
    if not prompts.is_file():
        raise SourceError(f"prompt set {prompts}: no such file")
    weight_format = base_manifest.get("weight_format", "fp16")
    # The adapter runs on the base's engine: it is validated, and served, with the base's numerics.
    numerics = pinned(base_manifest) or default_numerics()
    require_computable(numerics)

    source = resolve_source(adapter, "adapter", allow_pickle=allow_pickle)
    base_src = resolve_source(spec, "base")
    if recorded.get("revision") and base_src.revision != recorded["revision"]:
        raise PipelineError(
            f"{base!r} version {entry.version} was built from {spec} at {recorded['revision']}, "
            f"which is now {base_src.revision}: pass the original base with --base-source"
        )
    key = build_key(
        [
            source.revision,
            entry.path,
            base_manifest.get("build", {}).get("key"),
            file_digest(prompts),
            numerics.to_json(),
        ],
        weight_format,
        "runtime-adapter",
        tool_versions(),
    )
    if not overwrite and (live := up_to_date(repository, name, key)):
        log.info("%s is up to date: version %d holds the same adapter on the same base", name, live.version)
        return Published(name, live.version, modelrepo.open_store(repository).locate(live.path), False)

    adapter_dir = fresh_unless_present(fetch_source, snapshot_path(source))(source, allow_pickle=allow_pickle)
    base_dir = fresh_unless_present(fetch_source, snapshot_path(base_src))(base_src)
    fit = check_fit(base_dir, adapter_dir, allow_pickle=allow_pickle)
    log.info("%s fits %s: rank %d, scale %g (lora_alpha %g / r)", adapter, base, fit.rank, fit.scale, fit.lora_alpha)
    staged = stage(adapter_dir, work / f"adapter-{input_key(source.revision)}", allow_pickle=allow_pickle)
    # The base's IR, local: the version itself in a folder, a checked copy from an object store.
    base_ir = modelrepo.open_store(repository).local_copy(entry.path, work / "repository-cache")
    report = validate_adapter(base_ir, base_dir, staged, fit.scale, prompts, weight_format, numerics, publish_as=name)
    manifest = make_manifest(
        key=key,
        sources={
            "adapter": source.describe() | {"files": modelrepo.hash_files(staged)},
            "base": {"name": base, "version": entry.version, "source": base_src.describe()},
        },
        weight_format=weight_format,
        numerics=numerics,
        constant_types={},
        target_device=base_manifest.get("target_device", "CPU"),
        tools=tool_versions(),
        validation=report.summary(),
        flow_run=flow_run.get_id(),
    ) | {
        "adapter": {
            "rank": fit.rank,
            "lora_alpha": fit.lora_alpha,
            "scale": fit.scale,
            "target_modules": list(fit.target_modules),
        }
    }
    return publish(
        repository,
        name,
        "adapter",
        staged,
        manifest,
        base=base,
        alpha=fit.scale,
        retention=retention,
        report_markdown=report.markdown(name),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.publish_adapter", description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, help="LoRA adapter: hub id[@revision] or local folder")
    p.add_argument("--base", required=True, help="the served base model it applies to")
    p.add_argument("--name", required=True, help="the adapter's served name")
    p.add_argument("--repository", required=True, help="the model repository: a folder, or s3://bucket/prefix")
    p.add_argument("--prompts", type=Path, help=f"validation prompts, JSONL (default {DEFAULT_PROMPTS.name})")
    p.add_argument("--base-source", help="the base's torch weights, when its manifest records none")
    p.add_argument("--overwrite", action="store_true", help="publish even when the same adapter is live")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled (.bin) adapter weights")
    p.add_argument("--retention", type=int, default=3)
    p.add_argument("--work-dir", type=Path)
    return run("publish_adapter", publish_adapter, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

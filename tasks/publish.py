"""Publish a validated build into the model repository, with a manifest of what it was built from and how."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

import modelrepo
from modelrepo.numerics import Numerics
from tasks.logs import artifact_key, step_logger
from tasks.workdir import input_key

REPORT = "validation.md"  # the validation report, beside the manifest in every version


def build_key(inputs: list[Any], weight_format: str, target_device: str, tools: dict[str, str]) -> str:
    """What makes two builds the same: the exact inputs (pinned sources, the prompt set's digest, the
    numerics; any JSON-able values), the format, the device and the tools."""
    return input_key(inputs, weight_format, target_device, tools)


def live_build(repository: str | Path, name: str) -> tuple[modelrepo.Entry, dict[str, Any]] | None:
    """The live entry of `name` and its manifest, or None when `name` is not served."""
    store = modelrepo.open_store(repository)
    entry = store.snapshot().index.entries.get(name)
    if entry is None:
        return None
    try:
        return entry, store.read_manifest(entry.path)
    except modelrepo.RepositoryError:
        return None


def up_to_date(repository: str | Path, name: str, key: str) -> modelrepo.Entry | None:
    """The live entry of `name` if it was built from exactly this build key, else None."""
    live = live_build(repository, name)
    if live is None or live[1].get("build", {}).get("key") != key:
        return None
    return live[0]


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    path: Path | str  # the version folder, or its s3:// URL
    published: bool  # False: an identical build was already live (and --overwrite was not given)
    staged: bool = False  # published staged: live once promoted (`python -m modelrepo promote`)

    def __str__(self) -> str:
        if self.published and self.staged:
            return f"{self.name} version {self.version} is staged: {self.path} (live once promoted)"
        if self.published:
            return f"{self.name} version {self.version} is live: {self.path}"
        return f"{self.name} is up to date: version {self.version} was built from the same inputs ({self.path})"


def make_manifest(
    *,
    key: str,
    sources: dict[str, Any],
    weight_format: str,
    numerics: Numerics,
    constant_types: dict[str, int],
    target_device: str,
    tools: dict[str, str],
    validation: dict[str, Any],
    flow_run: str | None = None,
) -> dict[str, Any]:
    return {
        "build": {"key": key, "flow_run": flow_run, "built_at": datetime.now(UTC).isoformat(timespec="seconds")},
        "sources": sources,
        "weight_format": weight_format,  # read back from the written IR
        "numerics": numerics.to_json(),  # how every server computes it (graph.pbtxt's plugin_config too)
        "weight_constant_types": constant_types,
        "target_device": target_device,
        "tools": tools,
        "validation": validation,
    }


def publish_model(
    repository: str | Path,
    name: str,
    kind: modelrepo.index.Kind,
    folder: Path,
    manifest: dict[str, Any],
    *,
    target_device: str = "CPU",
    retention: int = 3,
    base: str | None = None,
    alpha: float | None = None,
    report_markdown: str | None = None,
    stage: bool = False,
) -> Published:
    """The build and its report as a new immutable version of `name` (modelrepo.publish_version), live at once
    or, with `stage`, staged: servers build its engine ahead and `python -m modelrepo promote` makes it live."""
    log = step_logger(__name__)
    log.info("publishing %s from %s into %s", name, folder, repository)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".publish-{name}-") as tmp:
        # The version holds the report beside the model; hard links keep the cached build untouched and cost nothing.
        staged = Path(tmp) / "version"
        shutil.copytree(folder, staged, copy_function=os.link)
        if report_markdown:
            (staged / REPORT).write_text(report_markdown, encoding="utf-8")
        entry = modelrepo.publish_version(
            repository, name, kind, staged, manifest,
            base=base, alpha=alpha, device=target_device, retention=retention, stage=stage,
        )  # fmt: skip
    log.info("%s version %d is %s in %s", name, entry.version, "staged" if stage else "live", repository)
    return Published(name, entry.version, modelrepo.open_store(repository).locate(entry.path), True, stage)


def announce(
    published: Published, kind: str, manifest: dict[str, Any], repository: str | Path, base: str | None
) -> None:
    """What is live now, in Prefect: a markdown and a link artifact under stable keys, and an event."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact
    from prefect.events import emit_event

    name = published.name
    validation = manifest.get("validation", {})
    key = artifact_key("published-" + name)
    where = published.path
    create_link_artifact(
        where.resolve().as_uri() if isinstance(where, Path) else where,
        link_text=f"{name} version {published.version}",
        key=key + "-folder",
        description=f"the version folder of {name} now live",
    )
    # Automations can react to a publish (reload a remote server, notify, run a smoke test).
    emit_event(
        event="lora.model.published",
        resource={
            "prefect.resource.id": f"lora.model.{name}",
            "prefect.resource.name": name,
            "lora.kind": kind,
            "lora.version": str(published.version),
            "lora.staged": str(published.staged).lower(),
        },
        payload={
            "name": name,
            "version": published.version,
            "kind": kind,
            "path": str(published.path),
            "repository": str(repository),
            "weight_format": manifest.get("weight_format"),
        },
    )
    state = "staged" if published.staged else "live"
    steer = (
        f"- promote: `python -m modelrepo promote --repository {repository} --model {name}`\n"
        if published.staged
        else f"- roll back: `python -m modelrepo rollback --repository {repository} --model {name}`\n"
    )
    create_markdown_artifact(
        f"# {name} version {published.version} is {state}\n\n"
        f"- kind: {kind}{' on ' + str(base) if kind == 'adapter' else ''}\n"
        f"- folder: `{published.path}`\n"
        f"- weights: {manifest.get('weight_format')} for {manifest.get('target_device')}\n"
        f"- numerics: {Numerics.from_json(manifest['numerics'])}\n"
        f"- validation: agreement {validation.get('agreement')} (at least {validation.get('min_agreement')}), "
        f"mean KL divergence {validation.get('kld_mean')}\n" + steer,
        key=key,
        description=f"the {state} version of {name}",
    )


def publish_and_announce(
    repository: str | Path,
    name: str,
    kind: modelrepo.index.Kind,
    folder: Path,
    manifest: dict[str, Any],
    **options: Any,
) -> Published:
    """The flows' last step: publish_model, then announce what is live."""
    published = publish_model(repository, name, kind, folder, manifest, **options)
    announce(published, kind, manifest, repository, options.get("base"))
    return published


# Never cached: publishing is the one step whose effect is the point of running it again.
publish = task(name="publish", task_run_name="publish-{name}", cache_policy=NO_CACHE)(publish_and_announce)

"""Resolve and fetch a base model, adapter or tokenizer: a hub id (pinned to a commit) or a local folder."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefect import task

from tasks.errors import SourceError, TransientSourceError
from tasks.logs import heartbeat, step_logger

Role = Literal["base", "adapter", "tokenizer"]
# Formats that unpickle on load, so they can run code: refused unless --allow-pickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_PATTERNS = [f"*{s}" for s in PICKLE_SUFFIXES]
# What each role must hold, whatever its weights' format.
REQUIRED: dict[str, tuple[str, ...]] = {
    "base": ("config.json",),
    "adapter": ("adapter_config.json",),
    "tokenizer": ("tokenizer_config.json",),
}
WEIGHT_NAMES = {"base": "model", "adapter": "adapter_model"}
LOCAL_PREFIXES = ("/", "./", "../", "~")


@dataclass(frozen=True)
class Source:
    """A source pinned to exact content: a hub commit sha, or the sha256 of a local folder's files."""

    spec: str  # what the user gave, e.g. "org/name@main" or "./adapters/sql"
    role: Role
    origin: Literal["hub", "local"]
    revision: str  # hub: the resolved commit sha; local: "sha256:<hash of every file>"
    repo_id: str | None = None
    requested_revision: str | None = None
    path: Path | None = None  # local folders only; hub sources get theirs from fetch_source
    files: tuple[str, ...] = field(default=())

    def describe(self) -> dict[str, Any]:
        """The manifest's record of this source."""
        body: dict[str, Any] = {"spec": self.spec, "origin": self.origin, "revision": self.revision}
        if self.origin == "hub":
            body |= {"repo_id": self.repo_id, "requested_revision": self.requested_revision or "main"}
        else:
            body["path"] = str(self.path)
        return body


def parse_spec(spec: str) -> tuple[str, str | None] | Path:
    """A local folder (an existing path, or one spelled like a path), else a hub id with an optional @revision."""
    if not spec or not spec.strip():
        raise SourceError("empty source: give a hub id (org/name[@revision]) or a local folder")
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith(LOCAL_PREFIXES) or spec.count("/") > 1:
        return path.resolve()
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def hash_folder(folder: Path) -> str:
    """sha256 over every file's relative path and content (hidden folders such as .cache left out)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts[:-1]):
            h.update(rel.as_posix().encode() + b"\0")
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()


def check_files(files: list[str], role: Role, where: str, *, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Refuse a source that lacks its config, holds only pickled weights, or ships code, unless allowed."""
    names = {Path(f).name for f in files}
    for required in REQUIRED[role]:
        if required not in names:
            raise SourceError(f"{role} {where} has no {required}: is it a {role} folder? files: {sorted(names)[:12]}")
    code = sorted(f for f in files if f.endswith(".py"))
    if code and not trust_remote_code:
        raise SourceError(f"{role} {where} ships Python code {code}: refused without --trust-remote-code")
    if role == "tokenizer":
        return
    safetensors = [f for f in files if f.endswith(".safetensors")]
    pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES) and WEIGHT_NAMES[role] in Path(f).name)
    if not safetensors:
        if not pickled:
            raise SourceError(f"{role} {where} holds no weights (no *.safetensors)")
        if not allow_pickle:
            raise SourceError(
                f"{role} {where} has only pickled weights {pickled}: loading them can run code, "
                "refused without --allow-pickle (convert them to safetensors instead)"
            )


def check_configs(folder: Path, role: Role, *, trust_remote_code: bool) -> None:
    """Refuse configs that ask transformers or peft to import custom classes (auto_map), unless allowed."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json", "adapter_config.json"):
        p = folder / name
        if not p.is_file():
            continue
        try:
            body = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise SourceError(f"{role} {folder}: {name} is not valid JSON: {e}") from None
        for key in ("auto_map", "auto_mapping"):
            value = body.get(key) if isinstance(body, dict) else None
            # peft records the class of a plain transformers base in auto_mapping: that is no custom code.
            if key == "auto_mapping" and isinstance(value, dict):
                value = None if str(value.get("parent_library", "")).startswith("transformers.") else value
            if value:
                raise SourceError(
                    f"{role} {folder}: {name} sets {key} {value!r} (custom code): refused without --trust-remote-code"
                )


def _hub_error(e: Exception, repo_id: str, revision: str | None, endpoint: str) -> SourceError:
    """Sort a hub failure into one worth retrying (network, 5xx, 429) and one that is final (not found, gated)."""
    import httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision or 'main'}"
    if isinstance(e, RevisionNotFoundError):
        return SourceError(f"revision {revision!r} of {repo_id} not found on {endpoint}")
    if isinstance(e, GatedRepoError):
        return SourceError(f"{repo_id} on {endpoint} is gated: accept its terms and set HF_TOKEN")
    if isinstance(e, RepositoryNotFoundError):
        return SourceError(f"{repo_id} not found on {endpoint} (nor is it a local folder)")
    cause = e.__cause__ if isinstance(e, LocalEntryNotFoundError) and e.__cause__ else e
    if isinstance(cause, (httpx.TransportError, ConnectionError, TimeoutError)) or (
        isinstance(cause, HfHubHTTPError)
        and cause.response is not None
        and cause.response.status_code in (429, 500, 502, 503, 504)
    ):
        detail = f"{type(cause).__name__}: {cause}".splitlines()[0]
        return TransientSourceError(f"could not fetch {at} from {endpoint} ({detail}), and it is no local folder")
    return SourceError(f"could not fetch {at} from {endpoint}: {type(e).__name__}: {e}".splitlines()[0])


def hub_endpoint() -> str:
    # Read at call time, not at huggingface_hub's import, so HF_ENDPOINT set later (tests, CLI) counts.
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cache() -> Path:
    """The hub cache, read at call time (HF_HUB_CACHE set after huggingface_hub's import counts)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE", constants.HF_HUB_CACHE))


def resolve(spec: str, role: Role, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Source:
    """Pin `spec` to exact content: ask the hub which commit a revision is, or hash a local folder."""
    log = step_logger(__name__)
    parsed = parse_spec(spec)
    if isinstance(parsed, Path):
        if not parsed.is_dir():
            raise SourceError(f"{role} {spec}: no such folder")
        files = [p.relative_to(parsed).as_posix() for p in parsed.rglob("*") if p.is_file()]
        check_files(files, role, str(parsed), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        check_configs(parsed, role, trust_remote_code=trust_remote_code)
        revision = hash_folder(parsed)
        log.info("%s %s: local folder, %s", role, parsed, revision[:19])
        return Source(spec, role, "local", revision, path=parsed, files=tuple(sorted(files)))
    repo_id, revision = parsed
    endpoint = hub_endpoint()
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision)
    except Exception as e:
        raise _hub_error(e, repo_id, revision, endpoint) from e
    files = [s.rfilename for s in info.siblings or []]
    check_files(
        files, role, f"{repo_id}@{revision or 'main'}", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    log.info("%s %s@%s: hub commit %s", role, repo_id, revision or "main", info.sha)
    return Source(
        spec, role, "hub", str(info.sha), repo_id=repo_id, requested_revision=revision, files=tuple(sorted(files))
    )


def snapshot_path(source: Source) -> Path:
    """Where the fetched files of `source` are (or will be): the folder itself, or the hub cache's snapshot."""
    if source.origin == "local":
        assert source.path is not None
        return source.path
    from huggingface_hub.file_download import repo_folder_name

    assert source.repo_id is not None
    return hub_cache() / repo_folder_name(repo_id=source.repo_id, repo_type="model") / "snapshots" / source.revision


def fetch(source: Source, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """The local folder holding `source` at its pinned revision; hub files are downloaded (pickles left out)."""
    log = step_logger(__name__)
    if source.origin == "local":
        path = snapshot_path(source)
        if hash_folder(path) != source.revision:
            raise SourceError(f"{source.role} {path} changed while the build ran: run it again")
        return path
    from huggingface_hub import snapshot_download

    assert source.repo_id is not None
    endpoint = hub_endpoint()
    log.info("downloading %s@%s from %s", source.repo_id, source.revision[:12], endpoint)
    try:
        with heartbeat(log, f"downloading {source.repo_id}"):
            folder = Path(
                snapshot_download(
                    source.repo_id,
                    revision=source.revision,  # the commit resolved before: "main" moving meanwhile changes nothing
                    endpoint=endpoint,
                    cache_dir=hub_cache(),
                    ignore_patterns=None if allow_pickle else PICKLE_PATTERNS,
                )
            )
    except Exception as e:
        raise _hub_error(e, source.repo_id, source.revision, endpoint) from e
    check_configs(folder, source.role, trust_remote_code=trust_remote_code)
    log.info("%s %s@%s is in %s", source.role, source.repo_id, source.revision[:12], folder)
    return folder


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry network trouble, never a missing or refused source."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TransientSourceError)


def _fetch_key(context: Any, parameters: dict[str, Any]) -> str:
    # Keyed on the pinned revision. The flow calls fetch_source through fresh_unless_present, so a
    # copy deleted since is fetched again: a cached path that no longer exists is worse than a download.
    source: Source = parameters["source"]
    flags = f"{parameters.get('allow_pickle', False)}-{parameters.get('trust_remote_code', False)}"
    return f"fetch-{source.origin}-{source.repo_id or snapshot_path(source)}-{source.revision}-{flags}"


# Both talk to the hub: a transient failure (network, 5xx, 429) is retried, a final one is not.
_hub_task = functools.partial(task, retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=is_transient)
resolve_source = _hub_task(name="resolve-source", task_run_name="resolve-{role}")(resolve)
fetch_source = _hub_task(
    name="fetch-source", task_run_name="fetch-{source.role}", cache_key_fn=_fetch_key, persist_result=True
)(fetch)

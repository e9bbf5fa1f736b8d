"""Writing the repository: immutable version folders, then the index, atomically, under a lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelrepo.errors import RepositoryError
from modelrepo.index import INDEX, Entry, Index, Kind, fsync_dir, read_index, write_atomic
from modelrepo.manifest import MANIFEST, hash_files
from modelrepo.names import check_name
from modelrepo.numerics import pinned
from modelrepo.ovms import write_config, write_graph

LOCK = ".lock"
STAGING = ".staging-"
# A staging folder this old belongs to a publish that died; younger ones may be a live publish.
STALE_STAGING_SECONDS = 6 * 3600


@contextlib.contextmanager
def locked(repository: Path) -> Iterator[None]:
    """Hold the repository's writer lock (an flock on REPO/.lock) for the block."""
    repository.mkdir(parents=True, exist_ok=True)
    with open(repository / LOCK, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def versions(repository: Path, name: str) -> list[int]:
    """The complete version folders of `name`, oldest first."""
    folder = repository / check_name(name)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _commit(repository: Path, index: Index) -> None:
    write_atomic(repository / INDEX, index.to_json())
    write_config(repository, index)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(d)


def publish_version(
    repository: str | os.PathLike[str],
    name: str,
    kind: Kind,
    source: str | os.PathLike[str],
    manifest: dict[str, Any],
    *,
    base: str | None = None,
    alpha: float | None = None,
    device: str = "CPU",
    retention: int = 3,
) -> Entry:
    """Copy `source` into a new version of `name`, make it live, and return its index entry.

    The version folder is complete and fsynced before the index names it; a publish killed at any
    point leaves the index on the previous version. `retention` versions are kept, plus any the
    index names.
    """
    repo = Path(repository)
    check_name(name)
    if retention < 1:
        raise RepositoryError(f"retention must be at least 1, got {retention}")
    if base is not None:
        check_name(base)
    staging = repo / name / f"{STAGING}{uuid.uuid4().hex}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(source, staging)
        if kind != "adapter":
            write_graph(staging, device, pinned(manifest))
        files = hash_files(staging)
        with locked(repo):
            index = read_index(repo)
            if kind == "adapter" and (base not in index.entries or index.entries[base].kind == "adapter"):
                raise RepositoryError(f"adapter {name!r}: base {base!r} is not a served model in {repo}")
            current = index.entries.get(name)
            if current is not None and current.kind != kind:
                raise RepositoryError(f"{name!r} is served as a {current.kind} model, not a {kind} one")
            version = max(versions(repo, name), default=0) + 1
            entry = Entry(
                name=name,
                kind=kind,
                version=version,
                base=base,
                alpha=alpha,
                published_at=datetime.now(UTC).isoformat(timespec="seconds"),
            ).check()
            body = {**manifest, "name": name, "kind": kind, "version": version, "files": files}
            if kind == "adapter":
                body |= {"base": base, "alpha": alpha}
            (staging / MANIFEST).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
            _fsync_tree(staging)
            os.rename(staging, repo / name / str(version))
            fsync_dir(repo / name)
            _commit(repo, index.with_entry(entry))
            _sweep(repo, name, read_index(repo), retention)
        return entry
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _sweep(repo: Path, name: str, index: Index, retention: int) -> None:
    """Remove versions past the retention count that the index does not name, and dead staging."""
    live = {e.version for e in index.entries.values() if e.name == name}
    for v in versions(repo, name)[:-retention]:
        if v not in live:
            shutil.rmtree(repo / name / str(v), ignore_errors=True)
    now = time.time()
    for p in (repo / name).glob(f"{STAGING}*"):
        if now - p.stat().st_mtime > STALE_STAGING_SECONDS:
            shutil.rmtree(p, ignore_errors=True)


def commit_entry(repository: str | os.PathLike[str], entry: Entry) -> Entry:
    """Point the index at an existing, complete version folder (the rollback primitive)."""
    repo = Path(repository)
    entry.check()
    with locked(repo):
        if not (repo / entry.path / MANIFEST).is_file():
            raise RepositoryError(f"{entry.path} is not a complete version folder in {repo}")
        _commit(repo, read_index(repo).with_entry(entry))
    return entry


def rollback(repository: str | os.PathLike[str], name: str, version: int | None = None) -> Entry:
    """Make an older version of `name` live again: `version`, or the newest one before the live one."""
    repo = Path(repository)
    with locked(repo):
        index = read_index(repo)
        current = index.entries.get(check_name(name))
        if current is None:
            raise RepositoryError(f"{name!r} is not served in {repo}; served: {sorted(index.entries) or 'none'}")
        kept = versions(repo, name)
        if version is None:
            older = [v for v in kept if v < current.version]
            if not older:
                raise RepositoryError(f"{name!r} has no version older than {current.version} left; kept: {kept}")
            version = older[-1]
        if version not in kept:
            raise RepositoryError(f"{name!r} has no version {version}; kept: {kept}")
        entry = Entry(
            name=name,
            kind=current.kind,
            version=version,
            base=current.base,
            alpha=current.alpha,
            published_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        if not (repo / entry.path / MANIFEST).is_file():
            raise RepositoryError(f"{entry.path} is not a complete version folder in {repo}")
        _commit(repo, index.with_entry(entry))
    return entry


def remove_entry(repository: str | os.PathLike[str], name: str) -> None:
    """Stop serving `name` (its folders stay until swept); a base with adapters on it is refused."""
    repo = Path(repository)
    with locked(repo):
        index = read_index(repo)
        if name not in index.entries:
            raise RepositoryError(f"{name!r} is not served in {repo}; served: {sorted(index.entries) or 'none'}")
        users = sorted(e.name for e in index.entries.values() if e.base == name)
        if users:
            raise RepositoryError(f"{name!r} is the base of adapters {users}: remove them first")
        _commit(repo, index.without(name))

"""Writing the repository: immutable versions, then the index, atomically; the local-folder store.

The public functions take a repository string (a folder, or s3://bucket/prefix: `modelrepo.store`)
and do the same on both. LocalStore keeps a folder's exact behaviour: staging folder, fsync,
rename, and an flock on REPO/.lock around every index change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelrepo.errors import RepositoryError
from modelrepo.index import INDEX, Entry, Index, Kind, fsync_dir, read_index, write_atomic
from modelrepo.manifest import MANIFEST, hash_files, read_manifest, verify_version
from modelrepo.names import check_name
from modelrepo.numerics import pinned
from modelrepo.ovms import write_config, write_graph
from modelrepo.store import NewVersion, Snapshot, Store, open_store

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
    repository: str | os.PathLike[str] | Store,
    name: str,
    kind: Kind,
    source: str | os.PathLike[str],
    manifest: dict[str, Any],
    *,
    base: str | None = None,
    alpha: float | None = None,
    device: str = "CPU",
    retention: int = 3,
    stage: bool = False,
) -> Entry:
    """Copy `source` into a new version of `name`, make it live, and return its index entry.

    The version is complete (and fsynced, or uploaded and read back) before the index names it; a
    publish killed at any point leaves the index on the previous version. `retention` versions are
    kept, plus any the index names. `stage`: the index names it as staged, not live; `promote` makes it
    live (servers build a staged model's engine ahead, so the promotion swaps with no compile).
    """
    check_name(name)
    if retention < 1:
        raise RepositoryError(f"retention must be at least 1, got {retention}")
    if base is not None:
        check_name(base)
    return open_store(repository).publish(
        NewVersion(name, kind, Path(source), manifest, base, alpha, device, retention, stage)
    )


def fits(index: Index, version: NewVersion, location: str) -> None:
    """Raise unless `version` may be published on `index`: an adapter's base is served, a name keeps its kind."""
    name, kind, base = version.name, version.kind, version.base
    if kind == "adapter" and (base not in index.entries or index.entries[base].kind == "adapter"):
        raise RepositoryError(f"adapter {name!r}: base {base!r} is not a served model in {location}")
    current = index.entries.get(name)
    if current is not None and current.kind != kind:
        raise RepositoryError(f"{name!r} is served as a {current.kind} model, not a {kind} one")


def _now() -> str:
    """An entry's `published_at`: when the index named it live."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _require_version(store: Store, path: str) -> None:
    """Raise unless `path` is a complete version in `store`: the index names no other."""
    if not store.has_version(path):
        raise RepositoryError(f"{path} is not a complete version folder in {store.location}")


def _entry_of(entries: dict[str, Entry], name: str, location: str, staged: bool = False) -> Entry:
    """`name`'s live (or staged) entry, or an error that lists the names there are."""
    entry = entries.get(name)
    if entry is None:
        missing, listed = ("has no staged version", "staged") if staged else ("is not served", "served")
        raise RepositoryError(f"{name!r} {missing} in {location}; {listed}: {sorted(entries) or 'none'}")
    return entry


def new_entry(version: NewVersion, number: int) -> Entry:
    return Entry(
        name=version.name,
        kind=version.kind,
        version=number,
        base=version.base,
        alpha=version.alpha,
        published_at=_now(),
    ).check()


def manifest_body(version: NewVersion, number: int, files: dict[str, str]) -> dict[str, Any]:
    body = {**version.manifest, "name": version.name, "kind": version.kind, "version": number, "files": files}
    if version.kind == "adapter":
        body |= {"base": version.base, "alpha": version.alpha}
    return body


class LocalStore:
    """A repository in a local (or shared POSIX) folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def snapshot(self) -> Snapshot:
        token = self.index_token()
        return Snapshot(read_index(self.root), token)

    def index_token(self) -> str | None:
        """index.json's inode, size and mtime: every commit renames a new file into place."""
        try:
            st = os.stat(self.root / INDEX)
        except FileNotFoundError:
            return None
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def read_index_if_changed(self, token: str | None) -> Snapshot | None:
        return None if self.index_token() == token else self.snapshot()

    def update_index(self, change: Callable[[Index], Index]) -> Index:
        with locked(self.root):
            index = change(read_index(self.root))
            _commit(self.root, index)
        return index

    def versions(self, name: str) -> list[int]:
        return versions(self.root, name)

    def has_version(self, path: str) -> bool:
        return (self.root / path / MANIFEST).is_file()

    def read_manifest(self, path: str) -> dict[str, Any]:
        return read_manifest(self.root / path)

    def verify_version(self, path: str) -> list[str]:
        return verify_version(self.root / path)

    def locate(self, path: str) -> Path:
        return self.root / path

    def local_copy(self, path: str, cache: Path) -> Path:
        return self.root / path

    def publish(self, version: NewVersion) -> Entry:
        repo, name, kind = self.root, version.name, version.kind
        staging = repo / name / f"{STAGING}{uuid.uuid4().hex}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(version.source, staging)
            if kind != "adapter":
                write_graph(staging, version.device, pinned(version.manifest))
            files = hash_files(staging)
            with locked(repo):
                index = read_index(repo)
                fits(index, version, str(repo))
                number = max(versions(repo, name), default=0) + 1
                entry = new_entry(version, number)
                body = manifest_body(version, number, files)
                (staging / MANIFEST).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
                _fsync_tree(staging)
                os.rename(staging, repo / name / str(number))
                fsync_dir(repo / name)
                _commit(repo, index.with_staged(entry) if version.stage else index.with_entry(entry))
                _sweep(repo, name, read_index(repo), version.retention)
            return entry
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _sweep(repo: Path, name: str, index: Index, retention: int) -> None:
    """Remove versions past the retention count that the index does not name, and dead staging."""
    live = {e.version for e in index.named() if e.name == name}
    for v in versions(repo, name)[:-retention]:
        if v not in live:
            shutil.rmtree(repo / name / str(v), ignore_errors=True)
    now = time.time()
    for p in (repo / name).glob(f"{STAGING}*"):
        if now - p.stat().st_mtime > STALE_STAGING_SECONDS:
            shutil.rmtree(p, ignore_errors=True)


def commit_entry(repository: str | os.PathLike[str] | Store, entry: Entry) -> Entry:
    """Point the index at an existing, complete version (the rollback primitive)."""
    store = open_store(repository)
    entry.check()

    def change(index: Index) -> Index:
        _require_version(store, entry.path)
        return index.with_entry(entry)

    store.update_index(change)
    return entry


def promote(repository: str | os.PathLike[str] | Store, name: str) -> Entry:
    """Make the staged version of `name` live (the second phase of a staged publish)."""
    store = open_store(repository)
    promoted: list[Entry] = []

    def change(index: Index) -> Index:
        staged = _entry_of(index.staged, check_name(name), store.location, staged=True)
        _require_version(store, staged.path)
        after = index.promoted(name, _now())
        promoted[:] = [after.entries[name]]
        return after

    store.update_index(change)
    return promoted[0]


def rollback(repository: str | os.PathLike[str] | Store, name: str, version: int | None = None) -> Entry:
    """Make an older version of `name` live again: `version`, or the newest one before the live one."""
    store = open_store(repository)
    chosen: list[Entry] = []

    def change(index: Index) -> Index:
        current = _entry_of(index.entries, check_name(name), store.location)
        kept = store.versions(name)
        target = version
        if target is None:
            older = [v for v in kept if v < current.version]
            if not older:
                raise RepositoryError(f"{name!r} has no version older than {current.version} left; kept: {kept}")
            target = older[-1]
        if target not in kept:
            raise RepositoryError(f"{name!r} has no version {target}; kept: {kept}")
        entry = Entry(
            name=name,
            kind=current.kind,
            version=target,
            base=current.base,
            alpha=current.alpha,
            published_at=_now(),
        )
        _require_version(store, entry.path)
        chosen[:] = [entry, current]
        return index.with_entry(entry)

    store.update_index(change)
    entry, previous = chosen
    # A retention sweep on an object store (no lock) may have removed the version between the check above
    # and the commit; it checks the index again after removing a manifest (ObjectStore._unversion), and this
    # checks the version after the commit: whichever comes second sees the other.
    if not store.has_version(entry.path):

        def undo(index: Index) -> Index:
            return index.with_entry(previous) if index.entries.get(name) == entry else index

        store.update_index(undo)
        raise RepositoryError(
            f"{entry.path} was removed by a retention sweep while rolling back to it; {previous.path} stays live"
        )
    return entry


def remove_entry(repository: str | os.PathLike[str] | Store, name: str) -> None:
    """Stop serving `name` (its folders stay until swept); a base with adapters on it is refused."""
    store = open_store(repository)

    def change(index: Index) -> Index:
        _entry_of(index.entries, name, store.location)
        users = sorted(e.name for e in index.entries.values() if e.base == name)
        if users:
            raise RepositoryError(f"{name!r} is the base of adapters {users}: remove them first")
        return index.without(name)

    store.update_index(change)

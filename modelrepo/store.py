"""Where a repository lives: a local folder or an object store (s3://bucket/prefix), behind one interface.

The contract (README, "The model repository") is the same on both; what makes it hold differs:

- A local folder (`modelrepo.publish.LocalStore`): a version is written into a staging folder,
  fsynced and renamed into place; the index is replaced by a rename under an flock on REPO/.lock,
  so writers take turns. The commit point is the rename of index.json.
- An object store (`modelrepo.objectstore.ObjectStore`): there is no rename and no lock. A version
  number is claimed by creating NAME/N/.publishing (If-None-Match: *), the files are uploaded under
  NAME/N/, read back and checked against their sha256, and NAME/N/manifest.json is written last.
  The index object is then replaced with a conditional write on the ETag it was read at (If-Match,
  or If-None-Match: * for the first); a writer that loses the race reads it again, reapplies its
  change and retries, so concurrent writers never lose an entry. The commit point is that
  conditional PUT of index.json.

Readers (a server replica) ask `index_token()` or `read_index_if_changed(token)` to learn cheaply
whether the index changed (a stat locally; a HEAD or a conditional GET on an object store).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from modelrepo.errors import RepositoryError
from modelrepo.index import Entry, Index, Kind

OBJECT_STORE_SCHEMES = ("s3://",)


@dataclass(frozen=True)
class Snapshot:
    """The index as read, and the store's token for that exact state (None: there is no index yet)."""

    index: Index
    token: str | None


@dataclass(frozen=True)
class NewVersion:
    """What `publish_version` asks a store to make durable, then live."""

    name: str
    kind: Kind
    source: Path
    manifest: dict[str, Any]
    base: str | None
    alpha: float | None
    device: str
    retention: int
    stage: bool = False  # staged (not live) until promoted: servers build its engine ahead


@runtime_checkable
class Store(Protocol):
    """The operations the repository contract needs from its storage. Paths are relative, with forward slashes."""

    location: str  # how messages name the repository: a folder, or s3://bucket/prefix

    def snapshot(self) -> Snapshot: ...

    def index_token(self) -> str | None:
        """The index's current token, cheaply (no body read); None when there is no index."""
        ...

    def read_index_if_changed(self, token: str | None) -> Snapshot | None:
        """The index if its token is no longer `token`, else None."""
        ...

    def update_index(self, change: Callable[[Index], Index]) -> Index:
        """Replace the index by change(current) atomically; `change` may raise, and runs again after a lost race."""
        ...

    def versions(self, name: str) -> list[int]:
        """The complete versions of `name` (their manifest written), oldest first."""
        ...

    def has_version(self, path: str) -> bool: ...

    def read_manifest(self, path: str) -> dict[str, Any]: ...

    def verify_version(self, path: str) -> list[str]:
        """Check every file of a version against its manifest; the problems found (empty: intact)."""
        ...

    def locate(self, path: str) -> Path | str:
        """A version's place: a local folder, or its URL on an object store."""
        ...

    def local_copy(self, path: str, cache: Path) -> Path:
        """A local folder holding the version, checked against its manifest (the version itself when local)."""
        ...

    def publish(self, version: NewVersion) -> Entry:
        """Write `version` as a new immutable version, complete and checked, then make it live."""
        ...


def is_object_store(repository: object) -> bool:
    return isinstance(repository, str) and repository.startswith(OBJECT_STORE_SCHEMES)


def open_store(repository: str | os.PathLike[str] | Store) -> Store:
    """The store a repository string names: s3://bucket/prefix, or else a local folder."""
    if isinstance(repository, Store):
        return repository
    text = os.fspath(repository)
    if is_object_store(text):
        from modelrepo.objectstore import ObjectStore

        return ObjectStore(text)
    if "://" in text:
        schemes = ", ".join(OBJECT_STORE_SCHEMES)
        raise RepositoryError(f"repository {text!r}: only local folders and {schemes} URLs are supported")
    from modelrepo.publish import LocalStore

    return LocalStore(Path(text))

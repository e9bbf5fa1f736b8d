"""index.json: the single file that says which version of every served name is live."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from modelrepo.errors import RepositoryError
from modelrepo.names import check_name

INDEX = "index.json"
FORMAT = 1
Kind = Literal["merged", "base", "adapter"]
KINDS: tuple[str, ...] = ("merged", "base", "adapter")
# An adapter version holds PEFT's two files under PEFT's names: what the pipeline stages, the server loads.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Entry:
    """One live name: a model (merged or base) or a runtime adapter on a base."""

    name: str
    kind: Kind
    version: int
    # Adapters only: the served base name they apply to, and the LoRA scale lora_alpha / r,
    # which openvino-genai needs passed explicitly.
    base: str | None = None
    alpha: float | None = None
    published_at: str = ""

    @property
    def path(self) -> str:
        """The version folder, relative to the repository root (always forward slashes)."""
        return f"{self.name}/{self.version}"

    def check(self) -> Entry:
        check_name(self.name)
        if self.kind not in KINDS:
            raise RepositoryError(f"entry {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise RepositoryError(f"entry {self.name!r}: version must be an integer >= 1, got {self.version!r}")
        if self.kind == "adapter":
            if self.base is None:
                raise RepositoryError(f"adapter {self.name!r} names no base")
            check_name(self.base)
            if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
                raise RepositoryError(f"adapter {self.name!r}: alpha must be a positive number, got {self.alpha!r}")
        return self


@dataclass(frozen=True)
class Index:
    """The whole index; `generation` grows by one on every commit, so a reader can tell a change.

    `staged`: complete versions not live yet (a two-phase publish): servers build their engines ahead, so
    that `promoted` (the commit that makes one live) swaps with no compile. A reader that does not know
    the key ignores it and serves what `models` says.
    """

    entries: dict[str, Entry] = field(default_factory=dict)
    generation: int = 0
    staged: dict[str, Entry] = field(default_factory=dict)

    def to_json(self) -> str:
        body: dict[str, object] = {"format": FORMAT, "generation": self.generation, "models": _bodies(self.entries)}
        if self.staged:
            body["staged"] = _bodies(self.staged)
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Index:
        try:
            body = json.loads(text)
        except ValueError as e:
            raise RepositoryError(f"{INDEX} is not valid JSON: {e}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("models"), dict):
            raise RepositoryError(f"{INDEX} is not a format-{FORMAT} index (no 'format': {FORMAT} and 'models' object)")
        entries = _entries(body["models"], "entry")
        staged = _entries(body.get("staged", {}), "staged entry")
        for e in [*entries.values(), *staged.values()]:
            if e.kind == "adapter" and (e.base not in entries or entries[e.base].kind == "adapter"):
                raise RepositoryError(f"{INDEX}: adapter {e.name!r} names base {e.base!r}, which is not a served model")
        generation = body.get("generation", 0)
        if not isinstance(generation, int):
            raise RepositoryError(f"{INDEX}: generation must be an integer, got {generation!r}")
        return cls(entries=entries, generation=generation, staged=staged)

    def with_entry(self, entry: Entry) -> Index:
        """`entry` live; a version of its name staged before it is no longer to be promoted."""
        staged = {k: v for k, v in self.staged.items() if k != entry.name or v.version > entry.version}
        return replace(
            self, entries={**self.entries, entry.name: entry.check()}, staged=staged, generation=self.generation + 1
        )

    def with_staged(self, entry: Entry) -> Index:
        return replace(self, staged={**self.staged, entry.name: entry.check()}, generation=self.generation + 1)

    def promoted(self, name: str, published_at: str) -> Index:
        """The staged version of `name` live (raises KeyError if none is staged)."""
        entry = replace(self.staged[name], published_at=published_at)
        return replace(
            self,
            entries={**self.entries, name: entry},
            staged={k: v for k, v in self.staged.items() if k != name},
            generation=self.generation + 1,
        )

    def without(self, name: str) -> Index:
        return replace(
            self,
            entries={k: v for k, v in self.entries.items() if k != name},
            staged={k: v for k, v in self.staged.items() if k != name},
            generation=self.generation + 1,
        )

    def named(self) -> list[Entry]:
        """Every version the index names, live or staged: none may be swept or evicted."""
        return [*self.entries.values(), *self.staged.values()]


def _bodies(entries: dict[str, Entry]) -> dict[str, dict[str, object]]:
    return {
        name: {k: v for k, v in asdict(e).items() if k != "name" and v is not None}
        for name, e in sorted(entries.items())
    }


def _entries(raw_entries: object, what: str) -> dict[str, Entry]:
    if not isinstance(raw_entries, dict):
        raise RepositoryError(f"{INDEX}: the {what}s are not an object")
    entries: dict[str, Entry] = {}
    for name, raw in raw_entries.items():
        if not isinstance(raw, dict):
            raise RepositoryError(f"{INDEX}: {what} {name!r} is not an object")
        try:
            entry = Entry(name=name, **raw)
        except TypeError as e:
            raise RepositoryError(f"{INDEX}: {what} {name!r}: {e}") from None
        entries[name] = entry.check()
    return entries


def read_index(repository: str | os.PathLike[str]) -> Index:
    """Read the live index; an absent index is an empty repository. A broken one raises.

    `repository` is a folder or s3://bucket/prefix (modelrepo.store).
    """
    if isinstance(repository, str) and "://" in repository:
        from modelrepo.store import open_store

        return open_store(repository).snapshot().index
    path = Path(repository) / INDEX
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Index()
    except UnicodeDecodeError:
        raise RepositoryError(f"{path} is not UTF-8 text") from None
    return Index.from_json(text)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one step: write a temp file beside it, fsync, rename, fsync the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600; readers may run as another user (OVMS in a container, a server replica).
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

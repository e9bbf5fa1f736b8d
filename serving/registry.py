"""The routing table (served name -> engine and adapter), built from the repository's index and hot-reloaded.

A reload reads index.json, works out which engines the new index needs (one per merged or base
model version, with the adapters published on it), builds the missing ones in a worker thread
while the current table keeps serving, then replaces the whole table in one assignment. A change
of adapters only (one published, a new version, one removed) on a model version whose engine has
LoRA variables on their weights is made on that engine, with no compile (Engine.set_adapters). Requests
hold the route they started with, so they finish on their version; engines the new table no
longer uses are retired and release their pipeline once idle. A version that fails to verify
against its manifest or to load is logged and kept in `failures` (readiness, /v1/config and
metrics show it), and the name keeps the route it had. A model version the index lists as staged
gets its engine built after the swap, beside the live one (`staged`), so the commit that promotes
it finds the engine built and swaps with no compile.

Changes are noticed by watchfiles on the repository folder (index.json is replaced atomically by
every publish, rollback and removal) and, for storage where file events are unreliable, by
comparing the index's generation number every `poll_interval` seconds. An engine whose process
died (a crash, the OOM killer) is rebuilt at once: its names answer 503 until it is back.

A repository on an object store is served from a local copy (`modelrepo.mirror.Mirror`): every
`poll_interval` seconds the mirror asks the store whether its index changed and, if so, downloads
and checks the new versions and replaces the copy's index; the registry then reloads from the copy
as from any folder, and the mirror evicts the versions neither the index nor the table uses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import watchfiles

import modelrepo
from modelrepo import ADAPTER_WEIGHTS, Entry, Index
from modelrepo.mirror import Mirror
from serving.adapter_targets import targets
from serving.engine import Engine, close_spare, load_engine
from serving.engine_core import AdapterSpec, EngineSettings
from serving.errors import ModelNotFound, NotReady

log = logging.getLogger(__name__)

EngineKey = tuple[str, tuple[tuple[str, int, float], ...]]  # (model version path, adapters (name, version, alpha))


def _slot(adapter: Entry) -> str:
    """An adapter version's name on its engine: a new version is a new adapter there, beside the one it replaces."""
    return f"{adapter.name}@v{adapter.version}"


@dataclass(frozen=True)
class Route:
    """Where a served name runs: an engine, and the adapter to activate on it (None: the model itself)."""

    entry: Entry
    engine: Engine
    adapter: str | None = None

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class Failure:
    version: int
    message: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Staged:
    """A staged version of a model: its engine built ahead (`error` None), so that its promotion swaps at once."""

    version: int
    error: str | None = None


class Registry:
    """Owns the engines and the routing table of one repository."""

    def __init__(
        self,
        repository: Path,
        settings: EngineSettings,
        poll_interval: float = 2.0,
        loader: Callable[..., Engine] = load_engine,
        mirror: Mirror | None = None,
    ) -> None:
        self.repository = repository  # a folder; with a mirror, its local copy (mirror.root)
        self.mirror = mirror
        self.loader = loader  # tests of the HTTP layer pass a fake engine's
        self.settings = settings
        self.poll_interval = poll_interval
        self.table: dict[str, Route] = {}
        self.failures: dict[str, Failure] = {}
        self.staged: dict[str, Staged] = {}  # the index's staged models, and whether their engines are ready
        self.generation: int | None = None
        self.ready = False
        self.reloads = 0
        self.engine_builds: collections.Counter[str] = collections.Counter()  # pipelines compiled, by model
        self.live_adapter_updates: collections.Counter[str] = collections.Counter()  # adapter sets changed in place
        self._engines: dict[EngineKey, Engine] = {}
        self._verified: dict[str, list[str]] = {}  # version path -> problems (versions are immutable)
        self._manifests: dict[str, dict[str, Any]] = {}  # version path -> its manifest without the file hashes
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._restarter: asyncio.Task[None] | None = None
        self._engine_died = asyncio.Event()
        self._retired: list[Engine] = []

    # ---- lifecycle ----

    async def open(self) -> None:
        """Start loading in the background: the server answers (503 not ready) while the models load."""
        if self.mirror is not None:
            self.mirror.open()
        if not self.repository.is_dir():
            raise FileNotFoundError(f"the repository {self.repository} is not a folder")
        self._watcher = asyncio.create_task(self._watch(), name="repository-watcher")
        self._restarter = asyncio.create_task(self._restart_dead_engines(), name="engine-restarter")

    async def close(self) -> None:
        for task in (self._watcher, self._restarter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        engines = list(self._engines.values()) + self._retired
        self.table = {}
        self._engines = {}
        await asyncio.gather(*(asyncio.to_thread(e.close) for e in engines), asyncio.to_thread(close_spare))
        if self.mirror is not None:
            self.mirror.close()

    # ---- lookups ----

    def route(self, name: str) -> Route:
        table = self.table  # one read: a swap in between cannot mix two tables
        route = table.get(name)
        if route is None:
            if not self.ready:
                raise NotReady("the server is still loading its models")
            raise ModelNotFound(name, list(table))
        return route

    # ---- reloading ----

    async def reload(self, force: bool = False) -> bool:
        """Bring the table in line with index.json (`force`: even if its generation is unchanged).

        Forced (POST /v1/config/reload), a bucket's copy is synced first: what the store says now is loaded.
        """
        if force and self.mirror is not None:
            await asyncio.to_thread(self.mirror.sync)
        async with self._lock:
            try:
                index = await asyncio.to_thread(modelrepo.read_index, self.repository)
            except (modelrepo.RepositoryError, OSError) as e:
                log.error("cannot read the index of %s: %s; keeping the current models", self.repository, e)
                self.failures["index.json"] = Failure(0, str(e))
                return False
            self.failures.pop("index.json", None)
            restart = self._forget_dead_engines()
            if index.generation == self.generation and self.table and not force and not restart:
                return False
            await self._apply(index)
            self.generation = index.generation
            self.reloads += 1
            return True

    def _forget_dead_engines(self) -> bool:
        """Drop the engines whose process died, so the reload builds them again; True if any serves."""
        for key, engine in list(self._engines.items()):
            if engine.dead:
                log.error("%s v%s: its engine process died; starting a new one", engine.name, engine.version)
                del self._engines[key]
        return any(r.engine.dead for r in self.table.values())

    async def _restart_dead_engines(self) -> None:
        """Rebuild an engine as soon as its process dies, rather than at the next poll."""
        while True:
            await self._engine_died.wait()
            self._engine_died.clear()
            try:
                await self.reload()
            except Exception:  # reported; the watcher's polls try again
                log.exception("restarting a dead engine failed")

    def _waker(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """What an engine's reader thread calls when its process dies: wake `_restart_dead_engines`."""

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
                loop.call_soon_threadsafe(self._engine_died.set)

        return wake

    async def _apply(self, index: Index) -> None:
        old = self.table
        table: dict[str, Route] = {}
        for entry in sorted(index.entries.values(), key=lambda e: e.name):
            if entry.kind == "adapter":
                continue
            adapters = [a for a in index.entries.values() if a.kind == "adapter" and a.base == entry.name]
            routes = await self._routes_for(entry, adapters, old)
            table.update(routes)
        for name in list(self.failures):
            if name not in index.entries and name != "index.json":
                del self.failures[name]
        self.table = table  # the swap: one assignment
        for engine in {id(r.engine): r.engine for r in table.values()}.values():
            if engine.yielded:  # its replacement failed (to load, or to verify): it keeps serving, at full priority
                engine.yield_cpu(False)
        used = {id(r.engine) for r in table.values()} | await self._warm_staged(index, table)
        for key, engine in list(self._engines.items()):
            if id(engine) not in used:
                del self._engines[key]
                engine.retire()
                self._retired.append(engine)
                log.info("retired %s v%s (releases its pipeline when idle)", engine.name, engine.version)
        self._retired = [e for e in self._retired if not e.released]
        log.info("serving %s", ", ".join(f"{n} v{r.entry.version}" for n, r in sorted(table.items())) or "nothing")

    async def _warm_staged(self, index: Index, table: dict[str, Route]) -> set[int]:
        """Build the engines of the staged models (after the swap: live changes do not wait); their ids.

        An engine is keyed by its version and adapter set, so the promotion finds it built and swaps with no
        compile. A staged adapter needs nothing ahead: it goes live on its base's running engine.
        """
        warm: set[int] = set()
        staged: dict[str, Staged] = {}
        for entry in sorted(index.staged.values(), key=lambda e: e.name):
            if entry.kind == "adapter":
                continue
            problems = await self._verify(entry)
            if not problems:
                adapters = [a for a in index.entries.values() if a.kind == "adapter" and a.base == entry.name]
                try:
                    engine = await self._engine(entry, await self._choose_adapters(entry, adapters, table))
                    warm.add(id(engine))
                except Exception as e:
                    problems = [f"load failed: {e}"]
            if problems:
                log.error("staged %s v%s cannot be served: %s", entry.name, entry.version, "; ".join(problems))
            elif self.staged.get(entry.name) != Staged(entry.version):
                log.info("staged %s v%s is ready: its promotion swaps at once", entry.name, entry.version)
            staged[entry.name] = Staged(entry.version, "; ".join(problems) or None)
        self.staged = staged
        return warm

    async def _routes_for(self, model: Entry, adapters: list[Entry], old: dict[str, Route]) -> dict[str, Route]:
        """Routes for a model and its adapters; on any failure, what served before keeps serving.

        The model's files are hashed while its engine loads (each takes seconds on a large model, and
        the reload waits for both): nothing serves from the version until they match its manifest,
        and a version that fails is dropped with the engine it loaded (retired by `_apply`).
        """
        previous = old.get(model.name)
        verifying = asyncio.create_task(self._verify(model))
        try:
            routes = await self._load(model, adapters, old, previous, verifying)
        except BaseException:
            verifying.cancel()
            raise
        problems = await verifying
        if problems:
            self._fail(model, "; ".join(problems))
            return self._keep(previous, old)
        return routes

    async def _load(
        self,
        model: Entry,
        adapters: list[Entry],
        old: dict[str, Route],
        previous: Route | None,
        verifying: asyncio.Task[list[str]],
    ) -> dict[str, Route]:
        chosen = await self._choose_adapters(model, adapters, old)
        before_engine = previous.engine if previous else None
        served_before = {(r.name, r.entry.version) for r in old.values() if r.adapter and r.engine is before_engine}
        try:
            engine = await self._engine(model, chosen, replacing=before_engine)
        except Exception as e:
            if await verifying:  # a file of the model is not what its manifest says: the caller reports that
                return self._keep(previous, old)
            # Blame the adapters that were not served before, if any: serve the model with the others.
            safe = [a for a in chosen if (a.name, a.version) in served_before]
            if len(safe) == len(chosen):
                log.error("cannot load %s v%s: %s", model.name, model.version, e)
                self._fail(model, f"load failed: {e}")
                return self._keep(previous, old)
            for a in chosen:
                if a not in safe:
                    self._fail(a, f"load failed on {model.name} v{model.version}: {e}")
            chosen = safe
            try:
                engine = await self._engine(model, chosen, replacing=before_engine)
            except Exception as e2:
                self._fail(model, f"load failed: {e2}")
                return self._keep(previous, old)
        self.failures.pop(model.name, None)
        routes = {model.name: Route(model, engine)}
        for a in chosen:
            routes[a.name] = Route(a, engine, adapter=_slot(a))
        return routes

    async def _choose_adapters(self, model: Entry, adapters: list[Entry], old: dict[str, Route]) -> list[Entry]:
        """The adapters to build `model`'s engine with: each checked; a broken one is reported and its previous
        version on this model, if any, kept."""
        chosen: list[Entry] = []
        for a in sorted(adapters, key=lambda a: a.name):
            bad = await self._verify(a)
            weights = self.repository / a.path / ADAPTER_WEIGHTS
            limit = self.settings.max_adapter_bytes
            if not bad and not weights.is_file():
                bad = [f"{a.path} has no {ADAPTER_WEIGHTS}"]
            elif not bad and (size := weights.stat().st_size) > limit:
                bad = [f"{a.path}/{ADAPTER_WEIGHTS} is {size} bytes, over the limit of {limit} (--max-adapter-bytes)"]
            elif not bad:
                try:  # its header, before any engine work: a file that is no adapter costs no compile
                    await asyncio.to_thread(targets, weights)
                except (OSError, ValueError) as e:
                    bad = [f"load failed: {e}"]
            if bad:
                self._fail(a, "; ".join(bad))
                before = old.get(a.name)
                if before is None or before.entry.base != model.name:
                    continue
                a = before.entry  # keep serving the adapter's previous version
            else:
                self.failures.pop(a.name, None)
            chosen.append(a)
        return chosen

    async def _engine(self, model: Entry, adapters: list[Entry], replacing: Engine | None = None) -> Engine:
        """The engine for a model version and adapter set: the loaded one, or a new one built in a thread.

        While a new one builds, the engine it will replace runs at a lower CPU priority: on a machine
        with no core to spare, the build then runs at nearly its idle speed, and the old engine's
        requests still finish (it is retired after the swap; a failed build gives it its priority back).
        """
        key: EngineKey = (model.path, tuple((a.name, a.version, float(a.alpha or 1.0)) for a in adapters))
        engine = self._engines.get(key)
        specs = [
            AdapterSpec(_slot(a), self.repository / a.path / ADAPTER_WEIGHTS, float(a.alpha or 1.0)) for a in adapters
        ]
        if engine is None and replacing is not None:
            engine = await self._update_adapters(replacing, model, specs, key)
        if engine is None:
            started = time.monotonic()
            if replacing is not None:
                replacing.yield_cpu()
            try:
                engine = await asyncio.to_thread(
                    self.loader, model.name, model.version, self.repository / model.path, specs, self.settings
                )
            except BaseException:
                if replacing is not None:
                    replacing.yield_cpu(False)
                raise
            engine.when_dead(self._waker(asyncio.get_running_loop()))
            log.info(
                "loaded %s v%s with adapters %s in %.1f s",
                model.name, model.version, [a.name for a in adapters] or "none", time.monotonic() - started,
            )
            self._engines[key] = engine
            self.engine_builds[model.name] += 1
        return engine

    async def _update_adapters(
        self, engine: Engine, model: Entry, specs: list[AdapterSpec], key: EngineKey
    ) -> Engine | None:
        """The engine of the same model version, now serving `specs` with no compile; None where it cannot."""
        if engine.folder != self.repository / model.path or engine.dead:
            return None
        started = time.monotonic()
        why = await asyncio.to_thread(engine.can_take, specs)
        if why is None:
            try:
                await asyncio.to_thread(engine.set_adapters, specs)
            except Exception as e:
                why = str(e)
        if why is not None:
            log.info("%s v%s: a new engine for its adapters (%s)", model.name, model.version, why)
            return None
        for k in [k for k, e in self._engines.items() if e is engine]:
            del self._engines[k]
        self._engines[key] = engine
        self.live_adapter_updates[model.name] += 1
        log.info(
            "%s v%s now serves adapters %s (no compile: %.2f s)",
            model.name, model.version, [s.name for s in specs] or "none", time.monotonic() - started,
        )
        return engine

    def _keep(self, previous: Route | None, old: dict[str, Route]) -> dict[str, Route]:
        if previous is None:
            return {}
        return {n: r for n, r in old.items() if r.engine is previous.engine}

    async def _verify(self, entry: Entry) -> list[str]:
        if entry.path not in self._verified:
            if self.mirror is not None:  # checked as it was downloaded (or now, if an earlier process did)
                check = await asyncio.to_thread(self.mirror.problems, entry.path)
            else:
                check = await asyncio.to_thread(modelrepo.verify_version, self.repository / entry.path)
            self._verified[entry.path] = check
        return self._verified[entry.path]

    def _fail(self, entry: Entry, message: str) -> None:
        log.error("%s v%s is not served: %s", entry.name, entry.version, message)
        self.failures[entry.name] = Failure(entry.version, message)

    async def _watch(self) -> None:
        """Reload when index.json is replaced; also poll its generation in case file events are lost."""

        if self.mirror is not None:
            return await self._poll_store(self.mirror)

        def is_index(_change: watchfiles.Change, path: str) -> bool:
            return Path(path).name == modelrepo.index.INDEX

        try:
            await self.reload()
        except Exception:  # reported; the watcher keeps trying on the next change
            log.exception("the first load of %s failed", self.repository)
        self.ready = True
        while True:
            try:
                async for _ in watchfiles.awatch(
                    self.repository,
                    watch_filter=is_index,
                    recursive=False,
                    rust_timeout=int(self.poll_interval * 1000),
                    yield_on_timeout=True,
                    debounce=200,
                ):
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a vanished folder or a watcher error: poll until it is back
                log.error("watching %s failed: %s; retrying", self.repository, e)
                await asyncio.sleep(self.poll_interval)

    async def _poll_store(self, mirror: Mirror) -> None:
        """Sync the local copy every `poll_interval` seconds; a task of its own reloads from it and evicts.

        Apart, so polls keep their pace, and `stale` its truth, while a large model loads. Ready once
        there is something to serve: the first sync, or a copy an earlier process left when the store
        cannot be reached at start (its versions are checked against their manifests again).
        """
        wake = asyncio.Event()
        reloader = asyncio.create_task(self._reload_copy(mirror, wake), name="copy-reloader")
        try:
            while True:
                await asyncio.to_thread(mirror.sync)  # never raises: a failure is the mirror's `error`
                if mirror.has_index() or not mirror.stale:
                    wake.set()  # every poll, as the folder's watcher: it also restarts dead engines
                await asyncio.sleep(self.poll_interval)
        finally:
            reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloader

    async def _reload_copy(self, mirror: Mirror, wake: asyncio.Event) -> None:
        """Reload from the copy when woken, then evict: never during a load, whose files must stay."""
        while True:
            await wake.wait()
            wake.clear()
            try:
                try:
                    await self.reload()
                finally:
                    self.ready = True  # as with a folder: ready after the first load, failed or not
                async with self._lock:  # not during a reload on demand (POST /v1/config/reload) either
                    # What the table serves stays too: a failed new version leaves the old one serving.
                    await asyncio.to_thread(mirror.evict, {r.entry.path for r in self.table.values()})
            except Exception:  # reported; the next wake tries again
                log.exception("loading the copy of %s failed", mirror.location)

    # ---- reporting ----

    def engine_counts(self) -> dict[str, int]:
        """Engines serving the table, built ahead for staged versions, and retired ones finishing their requests."""
        serving = {id(r.engine) for r in self.table.values()}
        return {
            "live": sum(id(e) in serving for e in self._engines.values()),
            "staged": sum(id(e) not in serving for e in self._engines.values()),
            "retiring": sum(not e.released for e in self._retired),
        }

    async def manifest(self, entry: Entry) -> dict[str, Any]:
        """The manifest of a live version, without its table of file hashes (read once: versions are immutable)."""
        if entry.path not in self._manifests:
            body = await asyncio.to_thread(modelrepo.read_manifest, self.repository / entry.path)
            self._manifests[entry.path] = {k: v for k, v in body.items() if k != "files"}
        return self._manifests[entry.path]

    def created(self, entry: Entry) -> int:
        try:
            return int(datetime.fromisoformat(entry.published_at).timestamp())
        except ValueError:
            return 0

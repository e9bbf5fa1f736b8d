"""A local copy of a repository on an object store: what a server replica loads from.

    mirror = Mirror("s3://bucket/models", Path("/var/cache/lora-serve"))
    mirror.open()                      # the cache folder is this process's (an flock)
    changed = mirror.sync()            # one poll; never raises: a failure is kept in `error`
    mirror.evict(serving={"merged_model/2", ...})  # and what the index names
    mirror.close()

`root` is laid out as a repository folder (index.json, config.json, NAME/N/), so a server loads
from it exactly as from a local repository; only what tells it of a change differs. A poll is a
conditional GET of index.json (If-None-Match: the ETag last synced; 304 carries no body). When the
index changed, every version it names that is not cached yet is downloaded into a temporary folder,
checked against its manifest's sha256s and renamed into place (`ObjectStore.local_copy`); then
config.json and index.json are replaced atomically, index.json last: the local commit point, so the
local index never names a version that is not whole. While the store cannot be reached the local
copy stays as it is (`stale`), and the next poll that reaches it catches up.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from modelrepo.errors import RepositoryError
from modelrepo.index import INDEX, read_index, write_atomic
from modelrepo.manifest import verify_version
from modelrepo.objectstore import DOWNLOADING, ObjectStore
from modelrepo.ovms import CONFIG, config_text

log = logging.getLogger(__name__)

LOCK = ".mirror.lock"
# A poll must fail fast when the store is down (obstore's defaults retry for up to 3 minutes).
POLL_CLIENT: dict[str, Any] = {"connect_timeout": timedelta(seconds=2), "timeout": timedelta(seconds=5)}
POLL_RETRY: dict[str, Any] = {"max_retries": 1, "retry_timeout": timedelta(seconds=5)}
# Downloads use the store's transfer timeouts (objectstore.TRANSFER_CLIENT); a stalled one is retried a few times.
DOWNLOAD_RETRY: dict[str, Any] = {"max_retries": 3, "retry_timeout": timedelta(seconds=60)}


class Mirror:
    """Keeps `root`, a local folder, in step with the repository at `url` (s3://bucket/prefix)."""

    def __init__(self, url: str, cache: Path) -> None:
        self.store = ObjectStore(url, retry_config=DOWNLOAD_RETRY)
        self.poller = ObjectStore(url, client_options=POLL_CLIENT, retry_config=POLL_RETRY)
        self.location = self.store.location
        self.cache = cache
        self.root = self.store.cache_folder(cache)
        self.token: str | None = None  # the ETag of the index last synced; None: not synced yet
        self.error: str | None = None  # why the last poll failed; None after a poll that reached the store
        self.last_sync: float | None = None  # time.time() of the last poll that reached the store
        self.polls = 0
        self.failed_polls = 0
        self.failures: dict[str, str] = {}  # version path -> why it cannot be used (does not match its manifest)
        self._have: set[str] = set()  # version paths downloaded or checked by this process
        self._lock: int | None = None
        # One sync or eviction at a time: a reload on demand may sync while the poll loop does.
        self._busy = threading.Lock()

    # ---- lifecycle ----

    def open(self) -> None:
        """Take the cache folder for this process: two servers syncing one folder would evict each other's versions."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RepositoryError(
                f"the cache folder {self.root} (of {self.location}) is used by another server: give each its own"
            ) from None
        self._lock = fd

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    # ---- state ----

    @property
    def stale(self) -> bool:
        """True while the local copy may be behind the store: the last poll failed, or none succeeded yet."""
        return self.error is not None or self.last_sync is None

    def age(self) -> float | None:
        """Seconds since a poll last reached the store (None: never)."""
        return None if self.last_sync is None else max(0.0, time.time() - self.last_sync)

    def has_index(self) -> bool:
        return (self.root / INDEX).is_file()

    # ---- syncing ----

    def sync(self) -> bool:
        """One poll; True if the local index was replaced. An unreachable store leaves everything as it was."""
        with self._busy:
            return self._poll()

    def _poll(self) -> bool:
        self.polls += 1
        try:
            changed = self._sync()
        except Exception as e:  # unreachable, timed out, an error answer: keep serving the copy, try next poll
            first = (str(e).splitlines() or [type(e).__name__])[0]
            if self.error is None:
                log.warning("%s cannot be read: %s; serving the local copy until it can", self.location, first)
            self.error = f"{type(e).__name__}: {first}"
            self.failed_polls += 1
            return False
        if self.error is not None:
            log.info("%s can be read again", self.location)
        self.error = None
        self.last_sync = time.time()
        return changed

    def _sync(self) -> bool:
        snap = self.poller.read_index_if_changed(self.token)
        if snap is None:
            return False
        for entry in snap.index.named():
            self._fetch(entry.path)
        write_atomic(self.root / CONFIG, config_text(snap.index))  # so OVMS could serve the copy too
        write_atomic(self.root / INDEX, snap.index.to_json())
        self.token = snap.token
        log.info("synced %s generation %s", self.location, snap.index.generation)
        return True

    def _fetch(self, path: str) -> None:
        """Download a version once; a version that does not match its manifest is recorded, not retried."""
        if path in self._have or path in self.failures:
            return
        started = time.monotonic()
        try:
            self.store.local_copy(path, self.cache)
        except RepositoryError as e:  # the version itself is bad: versions are immutable, so it stays bad
            log.error("%s cannot be served: %s", path, e)
            self.failures[path] = str(e)
            return
        self._have.add(path)
        log.info("downloaded %s/%s in %.1f s", self.location, path, time.monotonic() - started)

    def problems(self, path: str) -> list[str]:
        """What is wrong with a cached version (empty: intact); checked again if this process did not download it."""
        if path in self.failures:
            return [self.failures[path]]
        if path in self._have:
            return []
        return verify_version(self.root / path)

    def evict(self, serving: set[str]) -> list[str]:
        """Delete the cached versions neither the copy's index names nor `serving` holds, and dead downloads."""
        with self._busy:  # the index read here is the one the copy holds: a sync cannot replace it meanwhile
            return self._evict(serving | {e.path for e in read_index(self.root).named()})

    def _evict(self, keep: set[str]) -> list[str]:
        removed = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for version in sorted(folder.iterdir()):
                path = f"{folder.name}/{version.name}"
                if (version.name.isdigit() and path not in keep) or version.name.startswith(DOWNLOADING):
                    shutil.rmtree(version, ignore_errors=True)
                    self._have.discard(path)
                    removed.append(path)
            if not any(folder.iterdir()):
                folder.rmdir()
        self.failures = {p: m for p, m in self.failures.items() if p in keep}
        if removed:
            log.info("evicted %s from the cache", ", ".join(removed))
        return removed

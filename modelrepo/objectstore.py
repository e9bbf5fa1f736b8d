"""The repository on S3 and what speaks its API: the same contract with no rename and no lock.

    python -m modelrepo list --repository s3://bucket/models     (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)

Layout under s3://bucket/prefix, as in a folder::

    index.json            the commit point, replaced only by a conditional PUT on the ETag it was read at
    config.json           OVMS's view, rewritten after each commit (derived; never read by the contract)
    NAME/N/...            a version: its files, then NAME/N/manifest.json, written last
    NAME/N/.publishing    the claim on version number N, held by one publisher and refreshed (heartbeat)

How a publish goes, and why each step is safe without a lock:

1. Claim N: create NAME/N/.publishing with If-None-Match: *, N one past every number in use; a
   publisher that finds N taken tries N + 1. The claim is rewritten every `heartbeat` seconds with
   If-Match on its own last ETag, so a publisher whose claim was taken from it (swept as dead) knows.
2. Upload every file under NAME/N/, read each back and check its sha256; then write
   NAME/N/manifest.json (If-None-Match: *). A version is complete iff its manifest exists.
3. Commit: read index.json and its ETag, apply the entry, PUT with If-Match: ETag (If-None-Match: *
   when there is no index yet). A 412 means another writer committed in between: read again,
   reapply, retry with a random backoff. Nothing else ever writes index.json, so no commit is lost
   and `generation` grows by exactly one per commit.
4. Sweep: a NAME/N/ without a manifest none of whose objects changed for `stale_after` seconds is a
   dead publish (a live one refreshes its claim): deleted, claim last. Versions past the retention
   count that the index does not name are deleted, manifest first (so a half-deleted version is
   never complete). Incomplete multipart uploads of a killed publish are not listed by S3; a bucket
   lifecycle rule (AbortIncompleteMultipartUpload) removes them.

A publish killed at any point leaves index.json as it was: before step 3 nothing names NAME/N/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, GenericError, NotModifiedError, PreconditionError
from obstore.store import S3Store

from modelrepo.errors import RepositoryError
from modelrepo.index import INDEX, Entry, Index
from modelrepo.manifest import MANIFEST, _files, hash_files, manifest_body, verify_version
from modelrepo.numerics import pinned
from modelrepo.ovms import CONFIG, GRAPH, config_text, graph_text
from modelrepo.store import NewVersion, Snapshot

log = logging.getLogger(__name__)

CLAIM = ".publishing"
HEARTBEAT_SECONDS = 30.0
# A version prefix with no manifest and no object newer than this is a dead publish (a live one's claim is fresh).
STALE_SECONDS = 600.0
# How long a writer keeps retrying a commit it keeps losing before it gives up (nothing is committed then).
COMMIT_TIMEOUT_SECONDS = 120.0
_CHUNK = 8 << 20  # 8 MiB reads when hashing what was uploaded
DOWNLOADING = ".download-"  # a version being downloaded into a local cache: never a version (no digits-only name)


def parse_url(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix without slashes at its ends)."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise RepositoryError(f"repository {url!r}: no bucket (use s3://bucket/prefix)")
    return bucket, prefix.strip("/")


# obstore's default 30 s timeout covers a whole response, body included: a multi-GB upload, read-back or
# download would fail. A transfer may take long, but not stall: 30 s at most between reads.
TRANSFER_CLIENT: dict[str, Any] = {
    "connect_timeout": timedelta(seconds=5),
    "timeout": timedelta(hours=6),
    "read_timeout": timedelta(seconds=30),
}


def client(
    bucket: str, prefix: str, client_options: dict[str, Any] | None = None, retry_config: dict[str, Any] | None = None
) -> S3Store:
    """An S3Store configured the usual way: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_REGION
    (read by obstore from the environment), or AWS_PROFILE (credentials and region through boto3).

    `client_options` and `retry_config` are obstore's (timeouts, retries); None: TRANSFER_CLIENT's timeouts,
    obstore's retries.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    options: dict[str, Any] = {"allow_http": True} if endpoint.startswith("http://") else {}
    options |= TRANSFER_CLIENT if client_options is None else client_options
    provider = None
    if os.environ.get("AWS_PROFILE") and not os.environ.get("AWS_ACCESS_KEY_ID"):
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider

        provider = Boto3CredentialProvider(boto3.Session(profile_name=os.environ["AWS_PROFILE"]))
    return S3Store(
        bucket,
        prefix=prefix or None,
        client_options=options or None,  # type: ignore[arg-type]
        retry_config=retry_config,  # type: ignore[arg-type]
        credential_provider=provider,
    )


_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclass
class _Prefix:
    """What a listing found under NAME/N/."""

    keys: list[str] = field(default_factory=list)
    complete: bool = False  # its manifest exists
    claim: str | None = None
    newest: datetime = _NEVER
    claim_modified: datetime = _NEVER


def _upload(s3: S3Store, key: str, path: Path) -> None:
    """One file to one object (multipart above 5 MiB; an object appears whole or not at all)."""
    obstore.put(s3, key, path)


class _Claim:
    """NAME/N/.publishing: created only if absent, refreshed with If-Match on its own ETag until released."""

    def __init__(self, s3: S3Store, key: str, interval: float) -> None:
        self.s3, self.key, self.interval = s3, key, interval
        self.owner = uuid.uuid4().hex
        self.etag = obstore.put(s3, key, self._body(), mode="create", use_multipart=False)["e_tag"]
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"claim {key}", daemon=True)
        self._thread.start()

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": os.uname().nodename, "pid": os.getpid(),
                           "at": datetime.now(UTC).isoformat()}).encode()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.etag = obstore.put(self.s3, self.key, self._body(), mode={"e_tag": self.etag},
                                        use_multipart=False)["e_tag"]
            except (PreconditionError, FileNotFoundError):
                self.lost = f"the claim {self.key} was taken away (swept as stale?)"
                return
            except Exception:  # a transient error: the next beat tries again; a long outage ends in `lost`
                continue

    def held(self) -> None:
        if self.lost:
            raise RepositoryError(f"publish abandoned: {self.lost}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def release(self) -> None:
        self.stop()
        if not self.lost:
            with contextlib.suppress(Exception):  # the sweep removes a stale claim of a complete version
                obstore.delete(self.s3, self.key)


class ObjectStore:
    """A repository at s3://bucket/prefix."""

    def __init__(
        self,
        url: str,
        *,
        stale_after: float = STALE_SECONDS,
        heartbeat: float = HEARTBEAT_SECONDS,
        commit_timeout: float = COMMIT_TIMEOUT_SECONDS,
        client_options: dict[str, Any] | None = None,
        retry_config: dict[str, Any] | None = None,
    ) -> None:
        self.location = url.rstrip("/")
        self.s3 = client(*parse_url(url), client_options, retry_config)
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.commit_timeout = commit_timeout
        self.lost_races = 0  # commits that found the index changed since it was read, and retried

    # ---- the index ----

    def snapshot(self) -> Snapshot:
        try:
            result = obstore.get(self.s3, INDEX)
        except FileNotFoundError:
            return self._no_index()
        return Snapshot(self._parse(bytes(result.bytes())), result.meta["e_tag"])

    def _no_index(self) -> Snapshot:
        """An empty repository, once the bucket is known to exist: S3 answers 404 for a missing bucket too."""
        try:
            next(iter(obstore.list(self.s3, chunk_size=1)), None)
        except BaseError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RepositoryError(f"{self.location}: the bucket cannot be listed: {first}") from None
        return Snapshot(Index(), None)

    def _parse(self, data: bytes) -> Index:
        try:
            return Index.from_json(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise RepositoryError(f"{self.location}/{INDEX} is not UTF-8 text") from None

    def index_token(self) -> str | None:
        """The index's ETag, from a HEAD request; None when there is no index."""
        try:
            return obstore.head(self.s3, INDEX)["e_tag"]
        except FileNotFoundError:
            return self._no_index().token

    def read_index_if_changed(self, token: str | None) -> Snapshot | None:
        """A conditional GET (If-None-Match: token): 304 costs no body."""
        if token is None:
            snap = self.snapshot()
            return None if snap.token is None else snap
        try:
            result = obstore.get(self.s3, INDEX, options={"if_none_match": token})
        except NotModifiedError:
            return None
        except FileNotFoundError:
            return self._no_index()
        return Snapshot(self._parse(bytes(result.bytes())), result.meta["e_tag"])

    def update_index(self, change: Callable[[Index], Index]) -> Index:
        """Read, change, PUT If-Match the ETag read (If-None-Match: * for the first index); on 412, again."""
        deadline = time.monotonic() + self.commit_timeout
        backoff = 0.05
        attempted: Index | None = None
        while True:
            snap = self.snapshot()
            if attempted is not None and snap.index == attempted:
                # Our PUT landed, its answer did not (the client retried it and met its own ETag): done, once.
                self._write_config(attempted)
                return attempted
            index = change(snap.index)
            attempted = index
            mode: Any = "create" if snap.token is None else {"e_tag": snap.token}
            try:
                obstore.put(self.s3, INDEX, index.to_json().encode(), mode=mode, use_multipart=False)
            except (PreconditionError, AlreadyExistsError, GenericError) as e:
                # 412: the index changed since it was read. S3 may answer 409 ConditionalRequestConflict to
                # concurrent conditional writes of one key, and asks the writer to read again and retry: the same.
                if isinstance(e, GenericError) and " 409 " not in str(e):
                    raise
                self.lost_races += 1
                if time.monotonic() > deadline:
                    raise RepositoryError(
                        f"{self.location}/{INDEX} kept changing under this commit for {self.commit_timeout:g} s "
                        f"({self.lost_races} lost races); nothing was committed"
                    ) from None
                time.sleep(random.uniform(0, backoff))  # jitter, so racing writers do not collide again in step
                backoff = min(backoff * 2, 2.0)
                continue
            self._write_config(index)
            return index

    def _write_config(self, index: Index) -> None:
        """config.json from the index just committed; rewritten until it matches the newest index it can see."""
        for _ in range(10):
            obstore.put(self.s3, CONFIG, config_text(index).encode(), use_multipart=False)
            latest = self.snapshot().index
            if latest.generation <= index.generation:
                return
            index = latest  # a later commit's writer may have written its config before ours: write the newest

    # ---- versions ----

    def _scan(self, name: str) -> dict[int, _Prefix]:
        found: dict[int, _Prefix] = {}
        for batch in obstore.list(self.s3, prefix=name, chunk_size=1000):
            for meta in batch:
                rel = meta["path"].removeprefix(f"{name}/")
                head, _, rest = rel.partition("/")
                if not head.isdigit() or not rest:
                    continue
                p = found.setdefault(int(head), _Prefix())
                p.keys.append(meta["path"])
                p.newest = max(p.newest, meta["last_modified"])
                if rest == MANIFEST:
                    p.complete = True
                elif rest == CLAIM:
                    p.claim = meta["path"]
                    p.claim_modified = meta["last_modified"]
        return found

    def versions(self, name: str) -> list[int]:
        return sorted(n for n, p in self._scan(name).items() if p.complete)

    def has_version(self, path: str) -> bool:
        try:
            obstore.head(self.s3, f"{path}/{MANIFEST}")
        except FileNotFoundError:
            return False
        return True

    def read_manifest(self, path: str) -> dict[str, Any]:
        where = f"{self.location}/{path}/{MANIFEST}"
        try:
            data = bytes(obstore.get(self.s3, f"{path}/{MANIFEST}").bytes())
        except FileNotFoundError:
            raise RepositoryError(f"{where} is missing") from None
        return manifest_body(data, where)

    def _objects(self, path: str) -> list[str]:
        """The files of a version, relative to it, without its claim."""
        names = []
        for batch in obstore.list(self.s3, prefix=path, chunk_size=1000):
            names += [m["path"].removeprefix(f"{path}/") for m in batch]
        return sorted(n for n in names if n != CLAIM)

    def _sha256(self, key: str) -> str:
        h = hashlib.sha256()
        for chunk in obstore.get(self.s3, key).stream(min_chunk_size=_CHUNK):
            h.update(chunk)
        return h.hexdigest()

    def _check(self, path: str, expected: dict[str, str]) -> list[str]:
        """Every expected file is there with its sha256 (read back in full), and nothing else but the manifest."""
        present = set(self._objects(path))
        problems = []
        for rel, digest in sorted(expected.items()):
            if rel not in present:
                problems.append(f"{rel}: missing")
            elif self._sha256(f"{path}/{rel}") != digest:
                problems.append(f"{rel}: sha256 differs from the manifest")
        extra = sorted(present - set(expected) - {MANIFEST}) if not problems else []
        return problems + [f"{rel}: not in the manifest" for rel in extra]

    def verify_version(self, path: str) -> list[str]:
        try:
            expected: dict[str, str] = self.read_manifest(path)["files"]
        except RepositoryError as e:
            return [str(e)]
        return self._check(path, expected)

    def locate(self, path: str) -> str:
        return f"{self.location}/{path}"

    def cache_folder(self, cache: Path) -> Path:
        """Where `local_copy` puts this repository's versions under `cache`: a folder laid out like the repository."""
        # Keyed by the repository: two buckets may both hold base_model/1, with other weights.
        return cache / hashlib.sha256(self.location.encode()).hexdigest()[:16]

    def local_copy(self, path: str, cache: Path) -> Path:
        """Download a version into the cache (once: an intact copy of the same manifest is reused), checked.

        The files land in a temporary folder beside the version's and are renamed into place only once
        every one matches the manifest, so a version in the cache is always whole (DOWNLOADING: the
        prefix of those folders, which a process killed mid-download leaves behind).
        """
        dest = self.cache_folder(cache) / path
        cached = dest / MANIFEST
        try:
            remote = bytes(obstore.get(self.s3, f"{path}/{MANIFEST}").bytes())
        except FileNotFoundError:
            raise RepositoryError(f"{self.locate(path)} is not a complete version (no {MANIFEST})") from None
        if cached.is_file() and cached.read_bytes() == remote and not verify_version(dest):
            return dest
        tmp = dest.parent / f"{DOWNLOADING}{dest.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for rel in self._objects(path):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                with open(tmp / rel, "wb") as f:
                    for chunk in obstore.get(self.s3, f"{path}/{rel}").stream(min_chunk_size=_CHUNK):
                        f.write(chunk)
            problems = verify_version(tmp)
            if problems:
                raise RepositoryError(f"{self.locate(path)} does not match its manifest: {'; '.join(problems)}")
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ---- publishing ----

    def publish(self, version: NewVersion) -> Entry:
        from modelrepo.publish import fits, manifest_body, new_entry

        name = version.name
        fits(self.snapshot().index, version, self.location)  # fail before uploading gigabytes
        self.sweep(name, retention=None)  # a killed publish's leftovers go first
        source = version.source
        uploads = {rel: source / rel for rel in _files(source)}
        files = hash_files(source)
        graph = None
        if version.kind != "adapter":
            graph = graph_text(version.device, pinned(version.manifest)).encode()
            uploads.pop(GRAPH, None)
            files[GRAPH] = hashlib.sha256(graph).hexdigest()
        number, claim = self._claim(name)
        prefix = f"{name}/{number}"
        manifest_written = False
        try:
            for rel, path in sorted(uploads.items()):
                claim.held()
                _upload(self.s3, f"{prefix}/{rel}", path)
            if graph is not None:
                obstore.put(self.s3, f"{prefix}/{GRAPH}", graph, use_multipart=False)
            problems = self._check(prefix, files)
            if problems:
                raise RepositoryError(f"{self.locate(prefix)} failed its check after upload: {'; '.join(problems)}")
            claim.held()
            body = json.dumps(manifest_body(version, number, files), indent=2) + "\n"
            obstore.put(self.s3, f"{prefix}/{MANIFEST}", body.encode(), mode="create", use_multipart=False)
            manifest_written = True
            committed: list[Entry] = []

            def change(index: Index) -> Index:
                fits(index, version, self.location)
                committed[:] = [new_entry(version, number)]
                return index.with_staged(committed[0]) if version.stage else index.with_entry(committed[0])

            self.update_index(change)
        except BaseException:
            if not manifest_written:  # nothing can name an incomplete version: remove it now
                claim.stop()
                self._delete(self._scan(name).get(number, _Prefix()).keys, last=claim.key)
            raise
        finally:
            claim.release()
        self.sweep(name, retention=version.retention)
        return committed[0]

    def _claim(self, name: str) -> tuple[int, _Claim]:
        number = max(self._scan(name), default=0) + 1
        for _ in range(100):
            try:
                return number, _Claim(self.s3, f"{name}/{number}/{CLAIM}", self.heartbeat)
            except AlreadyExistsError:
                number += 1
        raise RepositoryError(f"{self.location}/{name}: could not claim a version number up to {number}")

    def _delete(self, keys: list[str], last: str | None = None) -> None:
        """Delete `keys`, `last` (a claim or a manifest) after the others, so a half-done delete is still recognised."""
        rest = [k for k in keys if k != last]
        for i in range(0, len(rest), 1000):
            obstore.delete(self.s3, rest[i : i + 1000])
        if last is not None and last in keys:
            obstore.delete(self.s3, last)

    def sweep(self, name: str, retention: int | None) -> list[str]:
        """Remove dead publishes of `name` and, with `retention`, complete versions past it the index does not name."""
        now = datetime.now(UTC)
        removed = []
        found = self._scan(name)
        for number, p in sorted(found.items()):
            if not p.complete and (now - p.newest).total_seconds() > self.stale_after:
                self._delete(p.keys, last=p.claim)  # the claim goes last: until then no one reuses the number
                removed.append(f"{name}/{number}")
            elif p.complete and p.claim and (now - p.claim_modified).total_seconds() > self.stale_after:
                obstore.delete(self.s3, p.claim)  # killed between its manifest and releasing its claim
        if retention is not None:
            live = {e.version for e in self.snapshot().index.named() if e.name == name}
            complete = sorted(n for n, p in found.items() if p.complete)
            for number in complete[:-retention]:
                p = found[number]
                # A version whose claim is fresh is about to be committed by its publisher: not ours to remove.
                claimed = p.claim is not None and (now - p.claim_modified).total_seconds() <= self.stale_after
                if number not in live and not claimed and self._unversion(name, number):
                    self._delete([k for k in p.keys if k != f"{name}/{number}/{MANIFEST}"], last=p.claim)
                    removed.append(f"{name}/{number}")
        return removed

    def _unversion(self, name: str, number: int) -> bool:
        """Delete a version's manifest (from then on the prefix is no version), unless a rollback names it meanwhile.

        Nothing locks the index against a rollback between reading it and deleting: so the manifest goes first,
        the index is read again, and a version it now names gets its manifest back. A rollback checks the
        version after its own commit (modelrepo.publish.rollback): whichever of the two comes second sees the other.
        """
        manifest = f"{name}/{number}/{MANIFEST}"
        try:
            body = bytes(obstore.get(self.s3, manifest).bytes())
        except FileNotFoundError:
            return True
        obstore.delete(self.s3, manifest)
        if any(e.name == name and e.version == number for e in self.snapshot().index.named()):
            obstore.put(self.s3, manifest, body)
            log.warning("%s/%s: rolled back to while it was being removed; kept", self.location, manifest)
            return False
        return True


"""One engine per loaded model version: the server's side of an engine process; knows nothing of HTTP.

How requests flow: an async handler tokenizes its prompt (with this side's own tokenizer), builds
a GenerationConfig and calls `Engine.submit`, which sends the job to the engine process
(serving/engine_process.py, where serving/engine_core.py schedules and steps the pipeline). A
reader thread takes the events each step sends back and hands them to the handlers' asyncio
queues with `loop.call_soon_threadsafe`, one wake-up per loop per step. A handler whose client
went away calls `Engine.cancel`; the engine drops the job and confirms it, which the `cancelled`
counter records.

If the engine process dies (a crash in OpenVINO, the OOM killer), its requests fail with an
engine error, the engine reports itself `dead` (and calls what `when_dead` gave it), and the
registry builds a new one at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import openvino_genai as ov_genai

from modelrepo.numerics import Numerics, capabilities, default_numerics, effective, engine_properties
from serving.adapter_targets import targets, uncovered
from serving.engine_core import FINAL, AdapterSpec, Cancelled, Delta, EngineSettings, Event, Failed, Job, config_fields
from serving.errors import EngineClosed, Overloaded
from serving.modelinfo import ModelInfo, read_model_info

log = logging.getLogger(__name__)

# Where the `serving` package lives, for the engine process's imports.
_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    config: ov_genai.GenerationConfig
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[int, Event]]  # shared by the choices of one HTTP request
    index: int = 0  # the choice this request produces
    want_logprobs: bool = False
    stream: bool = True  # send text as it comes; else all of it at the end
    id: int = -1
    done: bool = False  # its last event has arrived
    first_token_at: float | None = None  # time.monotonic() when its first text arrived


def _put_events(batch: list[tuple[Request, Event]]) -> None:
    """Runs on the requests' event loop: into their queues."""
    now = time.monotonic()
    for r, e in batch:
        if isinstance(e, Delta) and r.first_token_at is None:
            r.first_token_at = now
        r.events.put_nowait((r.index, e))


class Engine:
    """A model version (plus its base's adapters) served by an engine process."""

    def __init__(
        self, name: str, version: int, folder: Path, adapters: list[AdapterSpec], settings: EngineSettings
    ) -> None:
        self.name = name
        self.version = version
        self.folder = folder
        self.info: ModelInfo = read_model_info(folder)
        # The version's pinned numerics (an unpinned, older version: the default's), and what this CPU makes of them.
        applied = self.info.numerics or default_numerics()
        self.effective: Numerics = effective(applied)
        if self.effective != applied:
            log.warning(
                "%s v%s pins %s, but this CPU computes %s (OPTIMIZATION_CAPABILITIES %s): its tokens may differ "
                "from what its validation passed",
                name, version, applied, self.effective, capabilities(),
            )
        self.adapters = {a.name: a for a in adapters}  # every adapter it has been given (the core drops the old)
        self._built_with = list(adapters)  # decide which weights have a LoRA variable (serving.adapter_targets)
        self._adapter_replies: queue.Queue[str | None] = queue.Queue()
        self.settings = settings
        self._lock = threading.Lock()  # the requests table and the counters
        # The pipe's sending end has a lock of its own, which the reader never takes: a send blocked on
        # a full pipe can then never stop the reader from draining the engine's events.
        self._send_lock = threading.Lock()
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._retired = False
        self._dead = False
        self._on_death: Callable[[], None] | None = None
        self.steps = self.switches = self.cancelled = self.running = 0
        self.yielded = False  # runs at a lower priority while a replacement builds (yield_cpu)
        self._process, self._conn = _take_process()
        try:
            level = logging.getLogger().getEffectiveLevel()
            properties = engine_properties(self.effective)
            self._conn.send((f"{name} v{version}", level, folder, adapters, settings, properties))
            # While the engine process compiles: the handlers' tokenizer (prompts are tokenized here, in the
            # handlers' threads). openvino's binding deadlocks (the GIL against a C++ static guard) when two
            # threads make the process's first Tensor.data access at once: make one here, before any request can.
            self.tokenizer = ov_genai.Tokenizer(str(folder))
            _ = self.tokenizer.encode("warm-up").input_ids.data
            kind, message = self._conn.recv()
        except (EOFError, OSError):
            kind, message = "failed", "the engine process exited while loading"
        except BaseException:
            self._conn.close()  # the engine process exits when it finds the socket closed
            raise
        finally:
            _replenish()  # after the load: the next spare's imports would have taken CPU from it
        if kind != "ready":
            self._conn.close()
            code = self._process.wait(30)
            raise RuntimeError(message if code == 0 else f"{message} (exit code {code})")
        self._reader = threading.Thread(target=self._read, name=f"engine-{name}-{version}-reader", daemon=True)
        self._reader.start()

    # ---- state ----

    @property
    def pending(self) -> int:
        """Requests submitted whose last event has not arrived."""
        return len(self._requests)

    @property
    def released(self) -> bool:
        """The engine process has ended and its events are all delivered (a retired engine, once idle)."""
        return not self._reader.is_alive()

    @property
    def dead(self) -> bool:
        """The engine process ended without being retired or closed: it crashed or was killed."""
        return self._dead

    def when_dead(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the reader thread) once the engine process has died; at once if it has."""
        with self._lock:
            self._on_death, dead = callback, self._dead
        if dead:
            callback()

    # ---- the async side ----

    def submit(self, request: Request) -> None:
        if request.adapter is not None and request.adapter not in self.adapters:
            raise KeyError(f"adapter {request.adapter!r} is not registered on {self.name} v{self.version}")
        job = Job(
            next(self._ids),
            request.prompt_ids,
            config_fields(request.config),
            request.adapter,
            request.want_logprobs,
            request.stream,
        )
        with self._lock:
            if self._dead:
                raise EngineClosed(f"{self.name} v{self.version}: its engine process stopped and restarts: try again")
            if self._retired:
                raise EngineClosed(f"{self.name} v{self.version} is being replaced: try again")
            if len(self._requests) >= self.settings.max_queue:
                raise Overloaded(
                    f"{self.name} has {len(self._requests)} requests in flight, its limit: try again shortly",
                    retry_after=1,
                )
            request.id = job.id
            self._requests[job.id] = request
        try:
            self._send(("add", job))
        except OSError:  # the process has just died
            with self._lock:
                self._requests.pop(job.id, None)
            raise EngineClosed(f"{self.name} v{self.version} stopped: try again") from None

    def can_take(self, adapters: list[AdapterSpec]) -> str | None:
        """Why `set_adapters(adapters)` cannot serve them on this engine's pipeline (None: it can)."""
        if not self._built_with:
            return "built without adapters"
        try:
            compiled = frozenset().union(*(targets(a.path) for a in self._built_with))
            for a in adapters:
                if a.name not in self.adapters and (missing := uncovered(a.path, compiled)):
                    return f"{a.name} changes weights the pipeline has no LoRA variable for: {', '.join(missing[:3])}"
        except (OSError, ValueError) as e:
            return str(e)
        return None

    def set_adapters(self, adapters: list[AdapterSpec], timeout: float = 60.0) -> None:
        """Serve `adapters` on the running pipeline, with no compile (check `can_take` first); raises RuntimeError."""
        with self._lock:
            if self._retired or self._dead:
                raise EngineClosed(f"{self.name} v{self.version} is being replaced")
        with contextlib.suppress(queue.Empty):  # the late answer to a call that timed out is not this one's
            while True:
                self._adapter_replies.get_nowait()
        self._send(("adapters", adapters))
        try:
            error = self._adapter_replies.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the engine did not answer in {timeout:.0f} s") from None
        if error is not None:
            raise RuntimeError(error)
        self.adapters.update({a.name: a for a in adapters})

    def cancel(self, request: Request) -> None:
        with self._lock:
            if request.id not in self._requests:
                return  # finished already, or never submitted
        with contextlib.suppress(OSError):  # the process is gone: the reader fails the request
            self._send(("cancel", request.id))

    def retire(self) -> None:
        """Take no new requests; the engine finishes the ones it has, then its process exits."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
        with contextlib.suppress(OSError):
            self._send(("retire",))

    def yield_cpu(self, yielding: bool = True) -> None:
        """Run the engine process's threads at a lower priority (the server's niceness + 10), or back at the server's.

        Best effort: going back needs the privilege to raise a priority (root, or CAP_SYS_NICE) where
        RLIMIT_NICE does not allow it; without it the engine stays behind, which only matters to it
        while another process wants the CPU.
        """
        own = os.getpriority(os.PRIO_PROCESS, 0)
        _renice(self._process.pid, min(own + YIELD_NICENESS, 19) if yielding else own)
        self.yielded = yielding

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what runs and stop the engine process (server shutdown)."""
        with self._lock:
            self._retired = True
        with contextlib.suppress(OSError):
            self._send(("close",))
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("%s v%s: the engine process did not stop in %.0f s; killing it", self.name, self.version, timeout)
            self._process.kill()
            self._process.wait()
        self._reader.join(5)

    def _send(self, message: tuple) -> None:
        """A full pipe blocks for at most about one step: the engine reads its commands between steps."""
        with self._send_lock:
            self._conn.send(message)

    # ---- the reader thread ----

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "adapters":
                    self._adapter_replies.put(message[1])
                    continue
                _, events, (self.steps, self.switches, self.cancelled, self.running) = message
                self._dispatch(events)
        except (EOFError, OSError):
            pass  # the process ended: a retire, a close, or a crash
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(10)
            with self._lock:
                orphans = list(self._requests.values())
                self._requests.clear()
                crashed = not self._retired
                self._dead = crashed
                on_death = self._on_death
            if crashed:
                log.error(
                    "%s v%s: the engine process exited with code %s; %d requests failed",
                    self.name, self.version, self._process.returncode, len(orphans),
                )
                if on_death is not None:
                    on_death()
            message = f"the engine process exited (code {self._process.returncode})"
            self._deliver([(r, Failed(message)) for r in orphans])
            self._conn.close()

    def _dispatch(self, events: list[tuple[int, Event]]) -> None:
        out: list[tuple[Request, Event]] = []
        with self._lock:
            for job_id, event in events:
                r = self._requests.get(job_id)
                if r is None:
                    continue
                if isinstance(event, FINAL):
                    del self._requests[job_id]
                    r.done = True
                if not isinstance(event, Cancelled):  # nobody waits for a cancelled request
                    out.append((r, event))
        self._deliver(out)

    @staticmethod
    def _deliver(events: list[tuple[Request, Event]]) -> None:
        """Hand events to their event loops, one wake-up per loop rather than one per event."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Event]]] = {}
        for r, e in events:
            by_loop.setdefault(r.loop, []).append((r, e))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                loop.call_soon_threadsafe(_put_events, batch)


YIELD_NICENESS = 10  # added to the server's niceness for an engine being replaced, while its replacement builds


def _renice(pid: int, niceness: int) -> None:
    """Set every thread of `pid` to `niceness` (Linux: a niceness belongs to a thread, not to its process)."""
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # not Linux, or the process is gone
        return
    for tid in threads:
        with contextlib.suppress(OSError):  # a thread gone, or no privilege to raise a priority
            os.setpriority(os.PRIO_PROCESS, tid, niceness)


# One engine process started ahead, its imports done, waiting for its model: a load (a hot reload
# above all) then skips the interpreter's start and openvino's import, 0.3-0.5 s under load, for
# about 30 MB of memory of its own. It exits when its socket closes (`close_spare`, or the server's end).
_spare_lock = threading.Lock()
_spare: tuple[subprocess.Popen, Connection] | None = None


def _take_process() -> tuple[subprocess.Popen, Connection]:
    """The spare engine process if it is alive, else a new one."""
    global _spare
    with _spare_lock:
        taken, _spare = _spare, None
    if taken is not None and taken[0].poll() is None:
        return taken
    if taken is not None:
        taken[1].close()
    return _start_process()


def _replenish() -> None:
    global _spare
    with _spare_lock:
        if _spare is None:
            _spare = _start_process()


def close_spare() -> None:
    """Let the spare engine process exit (server shutdown)."""
    global _spare
    with _spare_lock:
        taken, _spare = _spare, None
    if taken is not None:
        taken[1].close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            taken[0].wait(10)


def _start_process() -> tuple[subprocess.Popen, Connection]:
    """`python -m serving.engine_process`, and our end of the socket pair it talks over.

    A fresh interpreter rather than multiprocessing's spawn, which would import the caller's
    __main__ again in the child; not a fork, which would copy the server's threads half-held.
    """
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))}
    with theirs:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.engine_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
        )
    return process, Connection(ours.detach())


def load_engine(name: str, version: int, folder: Path, adapters: list[AdapterSpec], settings: EngineSettings) -> Engine:
    """Build an engine (blocking: a second or more; call it in a worker thread)."""
    return Engine(name, version, folder, adapters, settings)

"""One continuous-batching engine per loaded model version, driven by one thread; knows nothing of HTTP.

How requests flow: an async handler tokenizes its prompt, builds a GenerationConfig and calls
`Engine.submit`, which queues the request and wakes the engine thread. That thread is the only one
that touches the `ContinuousBatchingPipeline`: it admits queued requests (`add_request`), calls
`step()` while any request runs, reads every handle after each step, detokenizes incrementally and
hands text deltas back to the handler's asyncio queue with `loop.call_soon_threadsafe`. A handler
whose client went away calls `Engine.cancel`; the thread cancels the handle.

Runtime LoRA adapters, and why the scheduler groups by adapter
---------------------------------------------------------------
openvino-genai (2026.4) registers every adapter when the pipeline is built (`AdapterConfig` in the
constructor's properties), ignores the adapters of an `add_request` config, and refuses different
adapters within one batch. What it does do: `generate()` applies its config's adapter set to the
pipeline's infer request, and that set stays active for the `step()`s that follow (measured:
after `generate` with adapter A, requests added with `add_request` produce exactly the merged
model's greedy output; after `generate` with an empty `AdapterConfig()`, exactly the base's).

So one engine per base model holds one pipeline with all the base's adapters registered, and the
requests are grouped by adapter (None is the base itself). The thread runs one group at a time,
with continuous batching inside the group. It switches groups only when the pipeline is empty:
it stops admitting new requests of the active group once another group waits and the active
group's time slice (`time_slice` seconds) is over, lets the running ones finish, then applies the
next group's adapter with a one-token `generate()` on a one-token prompt and admits that group.
The next group is the one whose oldest request has waited longest (FIFO across groups).

Trade-off: fair and exact (a request never waits longer than one slice plus the longest running
request, and each batch runs exactly one adapter so outputs equal the merged model's), at the
cost of draining the batch at every switch (the switch itself is ~2 ms on the tiny model) and of
running dynamic LoRA: measured on the tiny model, 16 requests x 64 tokens, a base with two
adapters registered runs its own requests (empty adapter set) at ~0.85x a plain pipeline and
adapter requests at ~0.5x. One pipeline per base keeps one copy of the weights and one KV cache;
a fused pipeline per hot adapter (MODE_FUSE, merged speed) would remove the LoRA cost for the most
requested adapters at the price of one more copy of the weights each, and is the next step if
one adapter dominates the traffic. The adapter set is fixed at construction, so a published or
removed adapter rebuilds the base's engine in the background while the old one serves (see
registry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from serving.errors import Overloaded
from serving.modelinfo import ModelInfo, read_model_info

log = logging.getLogger(__name__)

_CONTEXT_TOKENS = 4
_REPLACEMENT = "\ufffd"  # a multi-byte character cut in half by a token boundary: wait for the next token


@dataclass(frozen=True)
class EngineSettings:
    max_queue: int = 256  # requests waiting or running per engine before 503
    max_num_seqs: int = 64  # sequences in one continuous batch
    max_num_batched_tokens: int = 256  # per step; split-fuse prefill (STACK_NOTES: larger gave nothing)
    time_slice: float = 0.5  # seconds an adapter group keeps admitting while another group waits
    max_adapter_bytes: int = 1 << 30  # an adapter_model.safetensors above this is refused at load
    # OpenVINO CPU's cache of compiled kernels per input shape (its default holds 5000): memory grows
    # with every new batch shape until it is full. 0 keeps memory flat at about 20% of tiny-model
    # throughput (measured: 11.5 k against 9.2 k tokens/s, 16 requests); None keeps OpenVINO's default.
    cpu_runtime_cache: int | None = None


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path  # adapter_model.safetensors
    alpha: float  # lora_alpha / r: genai ignores adapter_config.json


@dataclass(frozen=True)
class Delta:
    text: str
    tokens: list[tuple[str, float]]  # (token text, logprob) of the new tokens, when logprobs were asked


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Finished | Failed


class EngineClosed(Exception):
    """The engine was retired after a reload: look the model up again."""


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    config: ov_genai.GenerationConfig
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[int, Event]]  # shared by the choices of one HTTP request
    index: int = 0  # the choice this request produces
    want_logprobs: bool = False
    submitted: float = field(default_factory=time.monotonic)
    # engine-thread state
    id: int = -1
    handle: object | None = None
    ids: list[int] = field(default_factory=list)
    done: bool = False
    first_token_at: float | None = None  # time.monotonic() when the engine produced the first token
    stream: bool = True  # send text as it comes; else all of it at the end
    # incremental detokenization: the last prompt tokens then the output; text before `read` is sent
    window: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0
    logprob_pending: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A few prompt tokens before the output make the first token decode as it does in context
        # (SentencePiece drops a leading space at the start of a text).
        self.window = self.prompt_ids[-_CONTEXT_TOKENS:]
        self.prefix, self.read = 0, len(self.window)

    def push(self, event: Event) -> None:
        # RuntimeError: the event loop is closed, the server is shutting down
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, event))


def _deliver(events: list[tuple[Request, Event]]) -> None:
    """Hand a step's events to their event loops, one wake-up per loop rather than one per event."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Event]]] = {}
    for r, e in events:
        by_loop.setdefault(r.loop, []).append((r, e))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[Request, Event]]) -> None:
    for r, e in batch:
        r.events.put_nowait((r.index, e))


class Engine:
    """A ContinuousBatchingPipeline for one version folder (plus its base's adapters) and its thread."""

    def __init__(
        self, name: str, version: int, folder: Path, adapters: list[AdapterSpec], settings: EngineSettings
    ) -> None:
        self.name = name
        self.version = version
        self.folder = folder
        self.info: ModelInfo = read_model_info(folder)
        self.adapters = {a.name: a for a in adapters}
        self.settings = settings
        # A tokenizer for the handlers' threads, apart from the pipeline's own used by the engine thread.
        self.tokenizer = ov_genai.Tokenizer(str(folder))
        # openvino's binding deadlocks (the GIL against a C++ static guard) when two threads make the
        # process's first Tensor.data access at once: make one here, before any request thread can.
        _ = self.tokenizer.encode("warm-up").input_ids.data
        scheduler = ov_genai.SchedulerConfig()
        scheduler.max_num_seqs = settings.max_num_seqs
        scheduler.max_num_batched_tokens = settings.max_num_batched_tokens
        properties: dict[str, object] = {}
        self._ov_adapters: dict[str, ov_genai.Adapter] = {}
        if adapters:
            registered = ov_genai.AdapterConfig()
            for a in adapters:
                self._ov_adapters[a.name] = ov_genai.Adapter(str(a.path))
                registered.add(self._ov_adapters[a.name], a.alpha)
            properties["adapters"] = registered
        if settings.cpu_runtime_cache is not None:
            properties["CPU_RUNTIME_CACHE_CAPACITY"] = settings.cpu_runtime_cache
        self._pipe = ov_genai.ContinuousBatchingPipeline(str(folder), scheduler, "CPU", properties)
        self._detok = self._pipe.get_tokenizer()
        self._bos = self.tokenizer.get_bos_token_id()
        self._cv = threading.Condition()
        self._incoming: list[Request] = []
        self._cancels: list[Request] = []
        self._pending = 0  # submitted and not finished, under _cv
        self._retired = False
        self._waiting: dict[str | None, deque[Request]] = {}
        self._running: dict[int, Request] = {}
        self._ids = itertools.count()
        self._active: str | None = None
        self._applied: str | bool | None = False  # adapter set applied to the pipeline; False: never set
        self._slice_start = 0.0
        self.steps = 0
        self.switches = 0  # adapter changes
        self.cancelled = 0  # requests dropped because their client went away
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}-{version}", daemon=True)
        self._thread.start()

    # ---- the async side ----

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def released(self) -> bool:
        """The thread has ended and dropped the pipeline (a retired engine, once idle)."""
        return not self._thread.is_alive()

    def submit(self, request: Request) -> None:
        if request.adapter is not None and request.adapter not in self.adapters:
            raise KeyError(f"adapter {request.adapter!r} is not registered on {self.name} v{self.version}")
        with self._cv:
            if self._retired:
                raise EngineClosed(self.name)
            if self._pending >= self.settings.max_queue:
                raise Overloaded(
                    f"{self.name} has {self._pending} requests in flight, its limit: try again shortly", retry_after=1
                )
            self._pending += 1
            self._incoming.append(request)
            self._cv.notify()

    def cancel(self, request: Request) -> None:
        with self._cv:
            if not request.done:
                self._cancels.append(request)
                self._cv.notify()

    def retire(self) -> None:
        """Take no new requests; the thread finishes the ones it has, then releases the pipeline."""
        with self._cv:
            self._retired = True
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what runs and stop the thread (server shutdown)."""
        with self._cv:
            self._retired = True
            self._cancels.extend(self._incoming)
            self._cancels.extend(r for q in self._waiting.values() for r in q)
            self._cancels.extend(self._running.values())
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._incoming or self._cancels or self._running or self._has_waiting()):
                        if self._retired:
                            return
                        self._cv.wait()
                    incoming, self._incoming = self._incoming, []
                    cancels, self._cancels = self._cancels, []
                for r in incoming:
                    self._waiting.setdefault(r.adapter, deque()).append(r)
                for r in cancels:
                    self._drop(r)
                try:
                    self._admit()
                    if self._running:
                        self._pipe.step()
                        self.steps += 1
                        self._collect()
                except Exception as e:  # a failed step fails its batch, not the engine
                    log.exception("%s v%s: step failed", self.name, self.version)
                    self._fail_running(f"the engine failed: {e}")
        finally:
            self._pipe = None  # release the weights and KV cache with the thread
            self._detok = None

    def _fail_running(self, message: str) -> None:
        for r in list(self._running.values()):
            with contextlib.suppress(Exception):
                r.handle.cancel()
            del self._running[r.id]
            self._finish(r, Failed(message))

    def _has_waiting(self) -> bool:
        return any(self._waiting.values())

    def _admit(self) -> None:
        if not self._has_waiting():
            return
        others = [k for k, q in self._waiting.items() if q and k != self._active]
        slice_over = bool(others) and time.monotonic() - self._slice_start > self.settings.time_slice
        if not self._running and others and (slice_over or not self._waiting.get(self._active)):
            # Pipeline empty: switch to the group whose oldest request has waited longest.
            self._active = min(others, key=lambda k: self._waiting[k][0].submitted)
            self._slice_start = time.monotonic()
            slice_over = False
        if slice_over:
            return  # drain the running batch before switching
        queue = self._waiting.get(self._active)
        if not queue:
            return
        if self.adapters and self._applied != self._active:
            try:
                self._apply_adapter(self._active)
            except Exception as e:
                log.exception("%s v%s: cannot activate adapter %s", self.name, self.version, self._active)
                self._applied = False
                while queue:
                    self._finish(queue.popleft(), Failed(f"cannot activate adapter {self._active}: {e}"))
                return
        while queue:
            r = queue.popleft()
            r.id = next(self._ids)
            try:
                ids = ov.Tensor(np.array([r.prompt_ids], dtype=np.int64))
                r.handle = self._pipe.add_request(r.id, ids, r.config)
            except Exception as e:
                self._finish(r, Failed(f"the engine refused the request: {e}"))
                continue
            self._running[r.id] = r

    def _apply_adapter(self, adapter: str | None) -> None:
        """Make `adapter` (None: none) the pipeline's active set: a one-token generate() on an empty pipeline."""
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = 1
        config.adapters = (
            ov_genai.AdapterConfig(self._ov_adapters[adapter], self.adapters[adapter].alpha)
            if adapter is not None
            else ov_genai.AdapterConfig()
        )
        self._pipe.generate([ov.Tensor(np.array([[self._bos]], dtype=np.int64))], [config])
        self._applied = adapter
        self.switches += 1

    def _drop(self, r: Request) -> None:
        if r.done:
            return
        queue = self._waiting.get(r.adapter)
        if queue and r in queue:
            queue.remove(r)
        elif r.id in self._running and r.handle is not None:
            r.handle.cancel()
            del self._running[r.id]
        self.cancelled += 1
        self._finish(r, Failed("cancelled"), notify=False)

    def _collect(self) -> None:
        """Read every handle after a step; detokenize all of them in one batched call, send the deltas.

        A detokenizer call costs about 0.5 ms whatever its batch size (an OpenVINO inference), so one
        call per step instead of one per request keeps a large batch from stalling on Python. Streams
        decode incrementally over a short window (the last prompt tokens, then the text not yet sent),
        so each step costs the same however long the output gets; other requests decode once, at the end.
        """
        updates: list[tuple[Request, list[tuple[int, float]], int, bool]] = []
        for r in list(self._running.values()):
            handle = r.handle
            new: list[tuple[int, float]] = []
            finish = ov_genai.GenerationFinishReason.NONE
            while handle.can_read():
                for out in handle.read().values():
                    lps = list(out.generated_log_probs) if r.want_logprobs else []
                    new.extend(itertools.zip_longest(out.generated_ids, lps, fillvalue=0.0))
                    if out.finish_reason != ov_genai.GenerationFinishReason.NONE:
                        finish = out.finish_reason
            status = handle.get_status()
            done = not (status == ov_genai.GenerationStatus.RUNNING and finish == ov_genai.GenerationFinishReason.NONE)
            if new or done:
                updates.append((r, new, finish, done))
        if not updates:
            return
        seqs: list[list[int]] = []
        spans: list[tuple[int, int]] = []  # per update: where its texts start in seqs, and the logprob tokens'
        now = time.monotonic()
        for r, new, _, done in updates:
            if new and r.first_token_at is None:
                r.first_token_at = now
            r.ids.extend(i for i, _ in new)
            r.logprob_pending.extend(new if r.want_logprobs else [])
            text_at = len(seqs)
            if r.stream:
                r.window.extend(i for i, _ in new)
                seqs += [r.window[r.prefix : r.read], r.window[r.prefix :]]
            elif done:
                seqs.append(r.ids)
            lp_at = len(seqs)
            if r.want_logprobs and (r.stream or done):
                seqs += [[i] for i, _ in r.logprob_pending]
            spans.append((text_at, lp_at))
        texts = self._detok.decode(seqs) if seqs else []
        out: list[tuple[Request, Event]] = []
        for (r, _, finish, done), (text_at, lp_at) in zip(updates, spans, strict=True):
            delta = ""
            if r.stream:
                before, full = texts[text_at], texts[text_at + 1]
                if not full.endswith(_REPLACEMENT) or done:  # else: half a character, wait for the rest
                    delta = full[len(before) :]
                    r.prefix, r.read = r.read, len(r.window)
            elif done:
                delta = texts[text_at]
            tokens: list[tuple[str, float]] = []
            if r.want_logprobs and (r.stream or done):
                tokens = [(texts[lp_at + k], lp) for k, (_, lp) in enumerate(r.logprob_pending)]
                r.logprob_pending = []
            if delta or tokens:
                out.append((r, Delta(delta, tokens)))
            if not done:
                continue
            del self._running[r.id]
            status = r.handle.get_status()
            if status == ov_genai.GenerationStatus.IGNORED:
                event: Event = Failed("the prompt does not fit the engine's KV cache")
            elif finish == ov_genai.GenerationFinishReason.NONE and status != ov_genai.GenerationStatus.FINISHED:
                event = Failed(f"the request ended with status {status.name}")
            else:
                reason = "length" if finish == ov_genai.GenerationFinishReason.LENGTH else "stop"
                event = Finished(reason, len(r.prompt_ids), len(r.ids))
            out.append((r, event))
            self._finish(r, event, notify=False)
        _deliver(out)

    def _finish(self, r: Request, event: Event, notify: bool = True) -> None:
        r.done = True
        if notify:
            r.push(event)
        with self._cv:
            self._pending -= 1


def load_engine(name: str, version: int, folder: Path, adapters: list[AdapterSpec], settings: EngineSettings) -> Engine:
    """Build an engine (blocking: a second or more; call it in a worker thread)."""
    return Engine(name, version, folder, adapters, settings)

"""The scheduling and decoding loop around one ContinuousBatchingPipeline; it runs in the engine process.

`EngineCore` knows nothing of HTTP, asyncio or processes: it takes `Job`s, and each `step()` admits
what it can, runs one pipeline step, and returns the events it produced.

Runtime adapters: openvino-genai registers every adapter at construction and refuses two adapters in
one batch, but a `generate()` leaves its adapter set active for the `step()`s that follow. So the
core runs one adapter group at a time (continuous batching inside it) and switches on an empty
pipeline, once the active group's `time_slice` is over and another group waits, oldest waiter first:
each batch runs exactly one adapter, and no request waits longer than one slice plus the running
requests. Its costs are measured in bench/ANALYSIS.md ("Design notes"). In the dynamic mode an adapter
set at construction only decides which weights get a LoRA variable: `set_adapters` adds adapters on
those weights (a new version of one, say) to the running pipeline, with no compile.

The plugin copies each weight out of the IR's memory-mapped `.bin` when it first runs it; between
steps the core releases the map's pages (modelrepo/mapped.py), so the weights are not resident twice.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from modelrepo.mapped import release
from serving.detokenizer import Detokenizer

log = logging.getLogger(__name__)

_CONTEXT_TOKENS = 4
_REPLACEMENT = "\ufffd"  # a multi-byte character cut in half by a token boundary: wait for the next token
# The plugin copies weights again for each new kernel shape (measured on the demo model: all of them at
# the prefill, then 30% of the map read again at the first decode step): released after every one of
# the first steps, then at most once a second (reading /proc/self/maps and the madvise: under a millisecond).
RELEASE_FIRST_STEPS = 16
RELEASE_EVERY_S = 1.0
# An adapter no longer wanted is dropped once idle and unwanted this long: a request that read its route
# just before the swap can still be submitted to it.
ADAPTER_GRACE_S = 10.0


@dataclass(frozen=True)
class EngineSettings:
    max_queue: int = 256  # requests waiting or running per engine before 503
    max_num_seqs: int = 64  # sequences in one continuous batch
    max_num_batched_tokens: int = 256  # per step; split-fuse prefill (measured: larger gave nothing)
    time_slice: float = 0.5  # seconds an adapter group keeps admitting while another group waits
    max_adapter_bytes: int = 1 << 30  # an adapter_model.safetensors above this is refused at load
    # OpenVINO CPU's cache of compiled kernels per input shape (its own default holds 5000): memory grows
    # with every new batch shape until it is full (+30% RSS in 70 s of tests/hardening/test_load.py).
    # Off, memory stays flat (+2.7%) for a throughput within noise on the tiny model and 0.95 on the
    # 135M benchmark model at 16 clients (2026-12-04, bench/ANALYSIS.md). None: OpenVINO's default.
    cpu_runtime_cache: int | None = 0
    # INFERENCE_NUM_THREADS of each engine; None: OpenVINO's choice, every core. Fewer leaves cores to other work
    # on the machine; several busy engines still do better on every core each (measured: bench/ANALYSIS.md).
    threads: int | None = None


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


@dataclass(frozen=True)
class Cancelled:
    """The job was dropped on request (its client went away): nobody waits for more."""


Event = Delta | Finished | Failed | Cancelled
FINAL = (Finished, Failed, Cancelled)


@dataclass(frozen=True)
class Job:
    """One sequence to generate, as the server sends it: plain data, so it crosses a process boundary."""

    id: int
    prompt_ids: list[int]
    config: dict[str, object]  # GenerationConfig fields (config_fields)
    adapter: str | None
    want_logprobs: bool = False
    stream: bool = True  # send text as it comes; else all of it at the end


_PLAIN = (bool, int, float, str, set, list)
_SKIPPED = {"parsers"}  # output parsers: not used by the server, and not plain data


def config_fields(config: ov_genai.GenerationConfig) -> dict[str, object]:
    """A GenerationConfig's settings as plain data (the binding's objects do not pickle)."""
    fields = {}
    for name in dir(config):
        if name.startswith("_") or name in _SKIPPED:
            continue
        value = getattr(config, name)
        if not callable(value) and isinstance(value, _PLAIN):
            fields[name] = value
    return fields


def build_config(fields: dict[str, object]) -> ov_genai.GenerationConfig:
    config = ov_genai.GenerationConfig()
    for name, value in fields.items():
        setattr(config, name, value)
    return config


@dataclass(eq=False)
class _Sequence:
    """A job in the core: its pipeline handle and the state of its incremental detokenization."""

    job: Job
    config: ov_genai.GenerationConfig
    arrived: float = field(default_factory=time.monotonic)
    handle: object | None = None
    ids: list[int] = field(default_factory=list)
    # the last prompt tokens then the output; text before `read` is sent
    window: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0
    logprob_pending: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A few prompt tokens before the output make the first token decode as it does in context
        # (SentencePiece drops a leading space at the start of a text).
        self.window = self.job.prompt_ids[-_CONTEXT_TOKENS:]
        self.prefix, self.read = 0, len(self.window)


class EngineCore:
    """A ContinuousBatchingPipeline for one version folder (plus its base's adapters) and its scheduler."""

    def __init__(
        self,
        folder: Path,
        adapters: list[AdapterSpec],
        settings: EngineSettings,
        numerics: dict[str, str] | None = None,
    ) -> None:
        """`numerics`: the properties for the version's pinned numerics (modelrepo.numerics.engine_properties)."""
        self.adapters = {a.name: a for a in adapters}
        self.settings = settings
        scheduler = ov_genai.SchedulerConfig()
        scheduler.max_num_seqs = settings.max_num_seqs
        scheduler.max_num_batched_tokens = settings.max_num_batched_tokens
        # Off, explicitly: cached KV blocks are not keyed by adapter, so a base request would reuse an
        # adapter request's prefix (and the reverse) on a shared prompt.
        scheduler.enable_prefix_caching = False
        properties: dict[str, object] = dict(numerics or {})
        self._ov_adapters: dict[str, ov_genai.Adapter] = {}
        self._unwanted: dict[str, float] = {}  # adapter -> when set_adapters left it out
        self._lora = bool(adapters)  # the graph has LoRA variables: every generate() sets its adapter set
        if adapters:
            registered = ov_genai.AdapterConfig(ov_genai.AdapterConfig.Mode.MODE_DYNAMIC)
            for a in adapters:
                self._ov_adapters[a.name] = ov_genai.Adapter(str(a.path))
                registered.add(self._ov_adapters[a.name], a.alpha)
            properties["adapters"] = registered
        if settings.cpu_runtime_cache is not None:
            properties["CPU_RUNTIME_CACHE_CAPACITY"] = settings.cpu_runtime_cache
        if settings.threads is not None:
            properties["INFERENCE_NUM_THREADS"] = settings.threads
        self._pipe = ov_genai.ContinuousBatchingPipeline(str(folder), scheduler, "CPU", properties)
        self._weights = [folder / "openvino_model.bin"]
        self._released_at = 0.0
        tokenizer = self._pipe.get_tokenizer()
        self._bos = tokenizer.get_bos_token_id()
        self._detok = Detokenizer(tokenizer, folder)
        self._waiting: dict[str | None, deque[_Sequence]] = {}
        self._running: dict[int, _Sequence] = {}
        self._active: str | None = None
        self._applied: str | bool | None = False  # adapter set applied to the pipeline; False: never set
        self._slice_start = 0.0
        self._step_failed = False
        self.steps = 0
        self.switches = 0  # adapter changes
        self.cancelled = 0  # jobs dropped on request
        self._warm_up()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def busy(self) -> bool:
        # A cancelled sequence left in the pipeline needs a step to go, unless steps fail: then it waits for
        # the next request's step rather than spin on a broken pipeline.
        leftovers = not self._step_failed and self._pipe.has_non_finished_requests()
        return bool(self._running) or any(self._waiting.values()) or leftovers

    @property
    def _empty(self) -> bool:
        """Nothing in the pipeline: a cancelled sequence stays in it until the next step drops it."""
        return not self._running and not self._pipe.has_non_finished_requests()

    def add(self, job: Job) -> list[tuple[int, Event]]:
        """Queue a job; a job the core cannot take is answered at once."""
        if job.adapter is not None and job.adapter not in self.adapters:
            return [(job.id, Failed(f"adapter {job.adapter!r} is not registered on this engine"))]
        try:
            config = build_config(job.config)
        except Exception as e:
            return [(job.id, Failed(f"the engine refused the request's settings: {e}"))]
        self._waiting.setdefault(job.adapter, deque()).append(_Sequence(job, config))
        return []

    def set_adapters(self, adapters: list[AdapterSpec]) -> None:
        """Serve `adapters` from now on: load the new ones; the others go once idle (ADAPTER_GRACE_S).

        Only for adapters on the weights the pipeline was built with (serving.adapter_targets checks that).
        """
        if not self._lora:
            raise ValueError("this engine was built without adapters: serving one needs a new engine")
        loaded = {a.name: ov_genai.Adapter(str(a.path)) for a in adapters if a.name not in self.adapters}
        self._ov_adapters.update(loaded)
        self.adapters.update({a.name: a for a in adapters})
        wanted = {a.name for a in adapters}
        now = time.monotonic()
        self._unwanted = {k: self._unwanted.get(k, now) for k in self.adapters if k not in wanted}

    def _drop_unwanted(self) -> None:
        now = time.monotonic()
        for name, since in list(self._unwanted.items()):
            idle = not self._waiting.get(name) and not (self._running and self._active == name)
            if idle and now - since >= ADAPTER_GRACE_S:
                del self._unwanted[name], self.adapters[name], self._ov_adapters[name]
                self._waiting.pop(name, None)

    def cancel(self, job_id: int) -> list[tuple[int, Event]]:
        """Drop a job, queued or running; one already finished is not there any more: nothing to do."""
        seq = self._running.pop(job_id, None)
        if seq is not None:
            with contextlib.suppress(Exception):
                seq.handle.cancel()
        else:
            for queue in self._waiting.values():
                seq = next((s for s in queue if s.job.id == job_id), None)
                if seq is not None:
                    queue.remove(seq)
                    break
        if seq is None:
            return []
        self.cancelled += 1
        return [(job_id, Cancelled())]

    def cancel_all(self) -> list[tuple[int, Event]]:
        ids = [*self._running, *(s.job.id for q in self._waiting.values() for s in q)]
        return [e for i in ids for e in self.cancel(i)]

    def step(self) -> list[tuple[int, Event]]:
        """Admit what can run, run one pipeline step, and return the events it produced."""
        events: list[tuple[int, Event]] = []
        if self._unwanted:
            self._drop_unwanted()
        try:
            events += self._admit()
            if not self._empty:
                self._pipe.step()
                self._step_failed = False
                self.steps += 1
                events += self._collect()
                self._release_weights()
        except Exception as e:  # a failed step fails its batch, not the engine
            log.exception("step failed")
            if not self._running:  # a step only to drop cancelled sequences: what waits for it would wait forever
                events += self._fail_waiting(f"the engine failed: {e}")
            self._step_failed = True
            events += self._fail_running(f"the engine failed: {e}")
        return events

    def _fail_waiting(self, message: str) -> list[tuple[int, Event]]:
        failed: list[tuple[int, Event]] = [(s.job.id, Failed(message)) for q in self._waiting.values() for s in q]
        self._waiting.clear()
        return failed

    def _fail_running(self, message: str) -> list[tuple[int, Event]]:
        failed: list[tuple[int, Event]] = []
        for seq in list(self._running.values()):
            with contextlib.suppress(Exception):
                seq.handle.cancel()
            del self._running[seq.job.id]
            failed.append((seq.job.id, Failed(message)))
        return failed

    def _admit(self) -> list[tuple[int, Event]]:
        if not any(self._waiting.values()):
            return []
        others = [k for k, q in self._waiting.items() if q and k != self._active]
        slice_over = bool(others) and time.monotonic() - self._slice_start > self.settings.time_slice
        if self._empty and others and (slice_over or not self._waiting.get(self._active)):
            # Pipeline empty: switch to the group whose oldest request has waited longest.
            self._active = min(others, key=lambda k: self._waiting[k][0].arrived)
            self._slice_start = time.monotonic()
            slice_over = False
        if slice_over:
            return []  # drain the running batch before switching
        queue = self._waiting.get(self._active)
        if not queue:
            return []
        failed: list[tuple[int, Event]] = []
        if self._lora and self._applied != self._active:
            if not self._empty:
                return []  # a cancelled sequence is still in the pipeline: the next step drops it
            try:
                self._apply_adapter(self._active)
            except Exception as e:
                log.exception("cannot activate adapter %s", self._active)
                self._applied = False
                while queue:
                    failed.append((queue.popleft().job.id, Failed(f"cannot activate adapter {self._active}: {e}")))
                return failed
        while queue:
            seq = queue.popleft()
            try:
                ids = ov.Tensor(np.array([seq.job.prompt_ids], dtype=np.int64))
                seq.handle = self._pipe.add_request(seq.job.id, ids, seq.config)
            except Exception as e:
                failed.append((seq.job.id, Failed(f"the engine refused the request: {e}")))
                continue
            self._running[seq.job.id] = seq
        return failed

    def _release_weights(self) -> None:
        """Release the IR's mapped pages the plugin has copied since the last time (see the module's docstring)."""
        now = time.monotonic()
        if self.steps <= RELEASE_FIRST_STEPS or now - self._released_at >= RELEASE_EVERY_S:
            self._released_at = now
            release(self._weights)

    def _warm_up(self) -> None:
        """Run the pipeline once before it serves: its first inference packs the weights and compiles kernels
        (0.3-0.6 s on the benchmark's 135M model), which the first requests of a hot reload would wait for."""
        self._generate(None, max_new_tokens=2)
        release(self._weights)

    def _apply_adapter(self, adapter: str | None) -> None:
        """Make `adapter` (None: none) the pipeline's active set: a one-token generate() on an empty pipeline."""
        self._generate(adapter, max_new_tokens=1)
        self.switches += 1

    def _generate(self, adapter: str | None, max_new_tokens: int) -> None:
        """generate() on a one-token prompt, on an empty pipeline; an engine with adapters applies `adapter`'s set."""
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = max_new_tokens
        config.ignore_eos = True
        if self._lora:
            config.adapters = (
                ov_genai.AdapterConfig(self._ov_adapters[adapter], self.adapters[adapter].alpha)
                if adapter is not None
                else ov_genai.AdapterConfig()
            )
        token = max(self._bos, 0)  # -1: the tokenizer has no BOS; any token will do
        self._pipe.generate([ov.Tensor(np.array([[token]], dtype=np.int64))], [config])
        self._applied = adapter if self._lora else False

    def _collect(self) -> list[tuple[int, Event]]:
        """Read every handle after a step; detokenize all of them in one batched call.

        What OpenVINO's detokenizer must decode (serving.detokenizer) costs about 0.5 ms a call whatever its
        batch size, so one call per step instead of one per request keeps a large batch from stalling. Streams
        decode incrementally over a short window (the last prompt tokens, then the text not yet sent),
        so each step costs the same however long the output gets; other requests decode once, at the end.
        """
        updates = [u for seq in list(self._running.values()) if (u := _read(seq)) is not None]
        if not updates:
            return []
        seqs: list[list[int]] = []
        spans = [_texts_to_decode(update, seqs) for update in updates]
        texts = self._detok.decode(seqs) if seqs else []
        out: list[tuple[int, Event]] = []
        for update, span in zip(updates, spans, strict=True):
            out += _events(update, texts, span)
            if update.done:
                del self._running[update.seq.job.id]
        return out


@dataclass
class _Update:
    """What one step produced for a sequence: its new (token, logprob)s and whether it has ended."""

    seq: _Sequence
    new: list[tuple[int, float]]
    finish: ov_genai.GenerationFinishReason
    done: bool


def _read(seq: _Sequence) -> _Update | None:
    """The tokens a step produced for `seq`, if any, or its end."""
    handle = seq.handle
    new: list[tuple[int, float]] = []
    finish = ov_genai.GenerationFinishReason.NONE
    while handle.can_read():
        for out in handle.read().values():
            lps = list(out.generated_log_probs) if seq.job.want_logprobs else []
            new.extend(itertools.zip_longest(out.generated_ids, lps, fillvalue=0.0))
            if out.finish_reason != ov_genai.GenerationFinishReason.NONE:
                finish = out.finish_reason
    status = handle.get_status()
    done = not (status == ov_genai.GenerationStatus.RUNNING and finish == ov_genai.GenerationFinishReason.NONE)
    return _Update(seq, new, finish, done) if new or done else None


def _texts_to_decode(update: _Update, seqs: list[list[int]]) -> tuple[int, int]:
    """Append the token lists `update` needs decoded to `seqs`; return where its texts and its logprob tokens start."""
    seq, new = update.seq, update.new
    seq.ids.extend(i for i, _ in new)
    seq.logprob_pending.extend(new if seq.job.want_logprobs else [])
    text_at = len(seqs)
    if seq.job.stream:
        seq.window.extend(i for i, _ in new)
        seqs += [seq.window[seq.prefix : seq.read], seq.window[seq.prefix :]]
    elif update.done:
        seqs.append(seq.ids)
    lp_at = len(seqs)
    if seq.job.want_logprobs and (seq.job.stream or update.done):
        seqs += [[i] for i, _ in seq.logprob_pending]
    return text_at, lp_at


def _events(update: _Update, texts: list[str], span: tuple[int, int]) -> list[tuple[int, Event]]:
    """The events of one sequence after a step: the text it may send now, then its end if it has ended."""
    seq, job, (text_at, lp_at) = update.seq, update.seq.job, span
    delta = ""
    if job.stream:
        before, full = texts[text_at], texts[text_at + 1]
        if not full.endswith(_REPLACEMENT) or update.done:  # else: half a character, wait for the rest
            delta = full[len(before) :]
            seq.prefix, seq.read = seq.read, len(seq.window)
    elif update.done:
        delta = texts[text_at]
    tokens: list[tuple[str, float]] = []
    if job.want_logprobs and (job.stream or update.done):
        tokens = [(texts[lp_at + k], lp) for k, (_, lp) in enumerate(seq.logprob_pending)]
        seq.logprob_pending = []
    out: list[tuple[int, Event]] = [(job.id, Delta(delta, tokens))] if delta or tokens else []
    if update.done:
        out.append((job.id, _end(seq, update.finish)))
    return out


def _end(seq: _Sequence, finish: ov_genai.GenerationFinishReason) -> Event:
    status = seq.handle.get_status()
    if status == ov_genai.GenerationStatus.IGNORED:
        return Failed("the prompt does not fit the engine's KV cache")
    if finish == ov_genai.GenerationFinishReason.NONE and status != ov_genai.GenerationStatus.FINISHED:
        return Failed(f"the request ended with status {status.name}")
    reason = "length" if finish == ov_genai.GenerationFinishReason.LENGTH else "stop"
    return Finished(reason, len(seq.job.prompt_ids), len(seq.ids))

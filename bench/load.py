"""Closed-loop load: C clients each sending their next request when the last one ends, over HTTP or in-process.

Both drivers measure the same things the same way: completion tokens per second over the wall
time of the whole load, and time to first token per request (from submitting it to its first
generated token reaching the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LIVE_PROBE_INTERVAL_S = 0.25


@dataclass
class Outcome:
    ttft: float | None  # seconds; None when no token came
    tokens: int
    latency: float
    error: str | None = None
    text: str = ""
    retried: bool = False
    sent: float = 0.0  # wall clock (time.time()) when the request was sent
    fingerprint: str | None = None  # the answer's system_fingerprint: the version that answered, "name/version"


@dataclass
class LoadResult:
    concurrency: int
    wall: float
    outcomes: list[Outcome] = field(default_factory=list)
    # Responsiveness while the load ran: HTTP, latency of GET /v2/health/live (the server's event loop);
    # in-process, the longest waits of a thread that only sleeps 1 ms (the GIL, held by the engine's step()).
    stalls_ms: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(o.tokens for o in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(o.error is not None for o in self.outcomes)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0

    @property
    def ttft_p50(self) -> float:
        ttfts = [o.ttft for o in self.outcomes if o.ttft is not None]
        return statistics.median(ttfts) if ttfts else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": len(self.outcomes),
            "failed": self.failed,
            "retried": sum(o.retried for o in self.outcomes),
            "completion_tokens": self.tokens,
            "wall_s": round(self.wall, 3),
            "tok_s": round(self.tok_s, 2),
            "ttft_p50_ms": round(self.ttft_p50 * 1000, 1),
            "errors": sorted({o.error for o in self.outcomes if o.error})[:3],
        } | self.stalls()

    def stalls(self) -> dict[str, float]:
        if not self.stalls_ms:
            return {}
        ms = self.stalls_ms
        return {"stall_p50_ms": round(statistics.median(ms), 1), "stall_max_ms": round(max(ms), 1)}


def generation_config(max_tokens: int, adapter: Any = None):
    """Greedy, EOS ignored, a fixed number of new tokens: what the HTTP requests ask for too."""
    import openvino_genai as ov_genai

    config = ov_genai.GenerationConfig()
    config.max_new_tokens = max_tokens
    config.ignore_eos = True
    config.do_sample = False
    config.apply_chat_template = False
    config.num_return_sequences = 1
    if adapter is not None:
        config.adapters = adapter
    return config


class InProcessEngine:
    """A ContinuousBatchingPipeline with the server's scheduler settings, stepped by the calling thread."""

    def __init__(self, folder: Path, adapters: list[tuple[Path, float]] | None = None) -> None:
        import openvino_genai as ov_genai

        from modelrepo.numerics import default_numerics, engine_properties
        from serving.engine_core import EngineSettings
        from serving.modelinfo import read_model_info

        defaults = EngineSettings()  # the server's own defaults, so both run the same scheduler
        scheduler = ov_genai.SchedulerConfig()
        scheduler.max_num_seqs = defaults.max_num_seqs
        scheduler.max_num_batched_tokens = defaults.max_num_batched_tokens
        scheduler.enable_prefix_caching = False
        # The version's pinned numerics, as the server applies them: both sides of a ratio compute alike.
        self.numerics = read_model_info(folder).numerics or default_numerics()
        properties: dict[str, Any] = dict(engine_properties(self.numerics))
        if defaults.cpu_runtime_cache is not None:  # the server's kernel cache setting too
            properties["CPU_RUNTIME_CACHE_CAPACITY"] = defaults.cpu_runtime_cache
        self.adapters: list[Any] = []
        if adapters:
            config = ov_genai.AdapterConfig()
            for path, alpha in adapters:
                a = ov_genai.Adapter(str(path))
                self.adapters.append((a, alpha))
                config.add(a, alpha)
            properties["adapters"] = config
        self.tokenizer = ov_genai.Tokenizer(str(folder))
        self.pipe = ov_genai.ContinuousBatchingPipeline(str(folder), scheduler, "CPU", properties)
        self._ids = 0

    def run(self, prompts: list[str], concurrency: int, max_tokens: int, turnaround_s: float = 0.0) -> LoadResult:
        """`concurrency` clients in a closed loop over `prompts`; tokenizing counts in each request's time.

        `turnaround_s`: a client sends its next request that long after its last ended, as one outside the
        engine's loop does (0: before the next step); its times count from then (bench/turnaround.py).
        """
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        config = generation_config(max_tokens)
        todo = deque(prompts)
        running: dict[int, tuple[Any, float, list[float | None], list[int]]] = {}
        result = LoadResult(concurrency, 0.0)

        def submit(t: float) -> None:
            prompt = todo.popleft()
            ids = self.tokenizer.encode(prompt).input_ids.data
            self._ids += 1
            handle = self.pipe.add_request(self._ids, ov.Tensor(np.array(ids, dtype=np.int64)), config)
            running[self._ids] = (handle, t, [None], [0])

        stop = threading.Event()

        def watch() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                time.sleep(0.001)
                now = time.perf_counter()
                result.stalls_ms.append((now - last - 0.001) * 1000)
                last = now

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.perf_counter()
        sends = [start] * min(concurrency, len(todo))  # when each client without a request sends its next one
        while running or (todo and sends):
            now = time.perf_counter()
            for t in [t for t in sends if t <= now]:
                sends.remove(t)
                submit(t)
            if not running:
                time.sleep(max(0.0, min(sends) - now))
                continue
            self.pipe.step()
            now = time.perf_counter()
            for rid, (handle, t, first, count) in list(running.items()):
                while handle.can_read():
                    for out in handle.read().values():
                        count[0] += len(out.generated_ids)
                if count[0] and first[0] is None:
                    first[0] = now - t
                status = handle.get_status()
                if status != ov_genai.GenerationStatus.RUNNING:
                    error = None if status == ov_genai.GenerationStatus.FINISHED else status.name
                    result.outcomes.append(Outcome(first[0], count[0], now - t, error))
                    del running[rid]
                    if len(sends) < len(todo):
                        sends.append(now + turnaround_s)
        result.wall = time.perf_counter() - start
        stop.set()
        watcher.join()
        return result

    def answer(self, prompt: str, max_tokens: int) -> str:
        """One greedy completion through generate() (used for the first answer after a cold load)."""
        config = generation_config(max_tokens)
        return self.pipe.generate([prompt], [config])[0].m_generation_ids[0]


def completion_body(model: str, prompt: str, max_tokens: int | None, stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "temperature": 0.0, "ignore_eos": True, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def stream_one(client: Any, url: str, body: dict[str, Any]) -> Outcome:
    """One streaming /v3/completions request; TTFT is the first SSE chunk that carries text.

    Like OpenAI's client, a request whose connection breaks before any response arrives (a pooled
    keep-alive connection the server closed just then) is sent again, once; `retried` records it.
    """
    import httpx

    t, sent = time.perf_counter(), time.time()
    try:
        async with client.stream("POST", url, json=body) as response:
            outcome = await _read_stream(response, t)
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
        outcome = await _stream_once(client, url, body, time.perf_counter())
        outcome.retried = True
        outcome.latency = time.perf_counter() - t
    except Exception as e:  # a dropped connection is a failed request, counted, not a crashed benchmark
        outcome = Outcome(None, 0, time.perf_counter() - t, f"{type(e).__name__}: {e}")
    outcome.sent = sent
    return outcome


async def _stream_once(client: Any, url: str, body: dict[str, Any], t: float) -> Outcome:
    try:
        async with client.stream("POST", url, json=body) as response:
            return await _read_stream(response, t)
    except Exception as e:
        return Outcome(None, 0, time.perf_counter() - t, f"{type(e).__name__}: {e}")


async def _read_stream(response: Any, t: float) -> Outcome:
    ttft: float | None = None
    tokens = 0
    text: list[str] = []
    fingerprint: str | None = None
    if response.status_code != 200:
        detail = (await response.aread()).decode(errors="replace")[:200]
        return Outcome(None, 0, time.perf_counter() - t, f"HTTP {response.status_code}: {detail}")
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            fingerprint = fingerprint or chunk.get("system_fingerprint")
            if "error" in chunk:
                error = f"error frame: {chunk['error'].get('message')}"
                return Outcome(ttft, tokens, time.perf_counter() - t, error)
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    text.append(choice["text"])
                    if ttft is None:
                        ttft = time.perf_counter() - t
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # a stream cut mid-way is a failed request, counted, not a crashed benchmark
        return Outcome(ttft, tokens, time.perf_counter() - t, f"{type(e).__name__}: {e}")
    return Outcome(ttft, tokens, time.perf_counter() - t, None, "".join(text), fingerprint=fingerprint)


async def http_load(
    base_url: str,
    models: list[str],
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    *,
    path: str = "/v3/completions",
    live: str = "/v2/health/live",
) -> LoadResult:
    """`concurrency` streaming clients in a closed loop; request i goes to models[i % len(models)].

    `path` and `live`: the server's completions endpoint and its liveness probe (another server's, for a peer).
    """
    import httpx

    todo = deque(enumerate(prompts))
    result = LoadResult(concurrency, 0.0)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(120.0), limits=limits) as client:

        async def worker() -> None:
            while todo:
                i, prompt = todo.popleft()
                body = completion_body(models[i % len(models)], prompt, max_tokens)
                result.outcomes.append(await stream_one(client, path, body))

        async def watch(done: asyncio.Event) -> None:
            while not done.is_set():
                t = time.perf_counter()
                # A keep-alive connection the server closes as it is reused raises here: not a figure.
                with contextlib.suppress(httpx.TransportError):
                    await client.get(live)
                    result.stalls_ms.append((time.perf_counter() - t) * 1000)
                # Four probes a second: enough samples over a run, little CPU taken from what is measured.
                await asyncio.sleep(LIVE_PROBE_INTERVAL_S)

        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall = time.perf_counter() - start
        done.set()
        await watcher
    return result

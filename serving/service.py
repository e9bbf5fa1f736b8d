"""Completions and chat completions: from a protocol request to engine requests and back to OpenAI's responses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from serving import protocol as p
from serving.engine import Request
from serving.engine_core import Delta, Failed, Finished
from serving.errors import ClientClosed, EngineClosed, EngineFailure, InvalidParameter, ServingError
from serving.metrics import Metrics
from serving.registry import Registry, Route

# A retired engine refuses new requests: look the name up again this many times.
_ROUTE_ATTEMPTS = 3


@dataclass
class Prepared:
    """A tokenized request: the prompts' ids and one GenerationConfig per choice."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    configs: list[list[object]]  # [prompt][choice]


@dataclass
class Generation:
    """The engine requests of one HTTP request (prompts x n choices), read as one stream of events."""

    route: Route
    requests: list[Request]
    prompt_tokens: int
    started: float
    completion_tokens: dict[int, int] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """The version that answers, as OpenAI's system_fingerprint: "name/version"."""
        return self.route.entry.path

    def cancel(self) -> None:
        for r in self.requests:
            self.route.engine.cancel(r)

    async def events(self) -> AsyncIterator[tuple[int, Delta | Finished]]:
        queue = self.requests[0].events
        left = len(self.requests)
        while left:
            index, event = await queue.get()
            if isinstance(event, Failed):
                self.cancel()
                raise EngineFailure(f"{self.route.name}: {event.message}")
            if isinstance(event, Finished):
                left -= 1
                self.completion_tokens[index] = event.completion_tokens
            yield index, event


class Service:
    """Drives the engines for the HTTP handlers and records the metrics of what they serve."""

    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics

    async def start(
        self, req: p.CompletionRequest | p.ChatCompletionRequest, prepare: Callable[[Route], Awaitable[Prepared]]
    ) -> tuple[Generation, Prepared]:
        """Route, prepare and submit; a retired engine (a reload in between) is retried on the new route."""
        n = req.n
        for attempt in range(_ROUTE_ATTEMPTS):
            route = self.registry.route(req.model)
            prepared = await prepare(route)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            requests = [
                Request(
                    prompt_ids=ids,
                    config=prepared.configs[i][j],
                    adapter=route.adapter,
                    loop=loop,
                    events=queue,
                    index=i * n + j,
                    want_logprobs=req.wants_logprobs,
                    stream=req.stream,
                )
                for i, ids in enumerate(prepared.prompt_ids)
                for j in range(n)
            ]
            submitted: list[Request] = []
            try:
                for r in requests:
                    route.engine.submit(r)
                    submitted.append(r)
            except EngineClosed:
                for r in submitted:
                    route.engine.cancel(r)
                if attempt == _ROUTE_ATTEMPTS - 1:
                    raise
                continue
            except BaseException:
                for r in submitted:
                    route.engine.cancel(r)
                raise
            tokens = sum(len(ids) for ids in prepared.prompt_ids)
            return Generation(route, requests, tokens, time.monotonic()), prepared
        raise AssertionError("unreachable")

    def record(self, gen: Generation, endpoint: str) -> None:
        model = gen.route.name
        done = time.monotonic()
        self.metrics.requests.labels(model, endpoint, "200").inc()
        self.metrics.prompt_tokens.labels(model).inc(gen.prompt_tokens)
        self.metrics.completion_tokens.labels(model).inc(sum(gen.completion_tokens.values()))
        firsts = [r.first_token_at for r in gen.requests if r.first_token_at is not None]
        self.metrics.ttft.labels(model).observe((min(firsts) if firsts else done) - gen.started)
        self.metrics.latency.labels(model).observe(done - gen.started)

    def usage(self, gen: Generation) -> p.Usage:
        completion = sum(gen.completion_tokens.values())
        return p.Usage(gen.prompt_tokens, completion, gen.prompt_tokens + completion)

    # ---- completions ----

    def _completion_preparer(self, req: p.CompletionRequest) -> Callable[[Route], Awaitable[Prepared]]:
        async def prepare(route: Route) -> Prepared:
            engine = route.engine
            ids = await asyncio.to_thread(
                lambda: [list(engine.tokenizer.encode(t).input_ids.data[0]) for t in req.prompts]
            )
            configs = [
                [
                    req.to_generation_config(
                        engine.info.generation_config,
                        prompt_tokens=len(x),
                        context_length=engine.info.context_length,
                        choice_index=j,
                        logprobs=1 if req.logprobs else 0,
                    )
                    for j in range(req.n)
                ]
                for x in ids
            ]
            return Prepared(req.prompts, ids, configs)

        return prepare

    async def completion(self, req: p.CompletionRequest, disconnected: asyncio.Event) -> p.Completion:
        gen, prepared = await self.start(req, self._completion_preparer(req))
        texts, logprobs, reasons = await _collect(gen, disconnected)
        choices = []
        for index in range(len(gen.requests)):
            prefix = prepared.prompts[index // req.n] if req.echo else ""
            text = prefix + texts[index]
            lp = None
            if req.logprobs is not None:
                lp = _completion_logprobs(logprobs[index], req.logprobs, len(prefix))
            choices.append(p.CompletionChoice(index, text, lp, reasons[index]))  # type: ignore[arg-type]
        self.record(gen, "completions")
        return p.Completion(
            p.new_id("cmpl"), p.now(), req.model, choices, self.usage(gen), system_fingerprint=gen.fingerprint
        )

    async def stream_completion(self, req: p.CompletionRequest) -> Stream:
        """Start generating (errors here are HTTP errors), then return the SSE data lines and a canceller."""
        gen, prepared = await self.start(req, self._completion_preparer(req))
        cid, created = p.new_id("cmpl"), p.now()

        def chunk(choices: list[p.CompletionChoice], usage: p.Usage | None = None) -> str:
            body = p.CompletionChunk(cid, created, req.model, choices, usage=usage, system_fingerprint=gen.fingerprint)
            return msgspec.json.encode(body).decode()

        async def frames() -> AsyncIterator[str]:
            try:
                if req.echo:
                    for index in range(len(gen.requests)):
                        yield chunk([p.CompletionChoice(index, prepared.prompts[index // req.n], None, None)])
                offsets: dict[int, int] = {}
                async for index, event in gen.events():
                    if isinstance(event, Delta):
                        lp = None
                        if req.logprobs is not None:
                            lp = _completion_logprobs(event.tokens, req.logprobs, offsets.get(index, 0))
                        offsets[index] = offsets.get(index, 0) + len(event.text)
                        yield chunk([p.CompletionChoice(index, event.text, lp, None)])
                    else:
                        yield chunk([p.CompletionChoice(index, "", None, event.finish_reason)])  # type: ignore[arg-type]
                if req.include_usage_in_stream:
                    yield chunk([], self.usage(gen))
                self.record(gen, "completions")
            except ServingError as e:
                yield error_frame(e, self.metrics, req.model)
            yield "[DONE]"

        return frames(), gen.cancel

    # ---- chat ----

    def _chat_preparer(self, req: p.ChatCompletionRequest) -> Callable[[Route], Awaitable[Prepared]]:
        async def prepare(route: Route) -> Prepared:
            engine = route.engine

            def tokenize() -> tuple[str, list[int]]:
                text = engine.tokenizer.apply_chat_template(req.history(), add_generation_prompt=True)
                # The template writes the BOS itself (as HF's apply_chat_template(tokenize=True) does not add one).
                return text, list(engine.tokenizer.encode(text, add_special_tokens=False).input_ids.data[0])

            try:
                text, ids = await asyncio.to_thread(tokenize)
            except Exception as e:
                raise InvalidParameter(
                    f"the model's chat template cannot render these messages: {e}", param="messages"
                ) from None
            configs = [
                [
                    req.to_generation_config(
                        engine.info.generation_config,
                        prompt_tokens=len(ids),
                        context_length=engine.info.context_length,
                        choice_index=j,
                        logprobs=1 if req.logprobs else 0,
                    )
                    for j in range(req.n)
                ]
            ]
            return Prepared([text], [ids], configs)

        return prepare

    async def chat(self, req: p.ChatCompletionRequest, disconnected: asyncio.Event) -> p.ChatCompletion:
        gen, _ = await self.start(req, self._chat_preparer(req))
        texts, logprobs, reasons = await _collect(gen, disconnected)
        choices = [
            p.ChatChoice(
                index,
                p.AssistantMessage(texts[index]),
                _chat_logprobs(logprobs[index]) if req.logprobs else None,
                reasons[index],  # type: ignore[arg-type]
            )
            for index in range(len(gen.requests))
        ]
        self.record(gen, "chat/completions")
        return p.ChatCompletion(
            p.new_id("chatcmpl"), p.now(), req.model, choices, self.usage(gen), system_fingerprint=gen.fingerprint
        )

    async def stream_chat(self, req: p.ChatCompletionRequest) -> Stream:
        gen, _ = await self.start(req, self._chat_preparer(req))
        cid, created = p.new_id("chatcmpl"), p.now()

        def chunk(choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> str:
            body = p.ChatCompletionChunk(
                cid, created, req.model, choices, usage=usage, system_fingerprint=gen.fingerprint
            )
            return msgspec.json.encode(body).decode()

        async def frames() -> AsyncIterator[str]:
            try:
                for index in range(len(gen.requests)):
                    yield chunk([p.ChatChunkChoice(index, p.ChatDelta(role="assistant", content=""), None, None)])
                async for index, event in gen.events():
                    if isinstance(event, Delta):
                        lp = _chat_logprobs(event.tokens) if req.logprobs else None
                        yield chunk([p.ChatChunkChoice(index, p.ChatDelta(content=event.text), lp, None)])
                    else:
                        yield chunk([p.ChatChunkChoice(index, p.ChatDelta(), None, event.finish_reason)])  # type: ignore[arg-type]
                if req.include_usage_in_stream:
                    yield chunk([], self.usage(gen))
                self.record(gen, "chat/completions")
            except ServingError as e:
                yield error_frame(e, self.metrics, req.model)
            yield "[DONE]"

        return frames(), gen.cancel


# The SSE data lines, and what cancels the generation: the HTTP layer calls it once the response is
# over, a disconnect included (an abandoned async generator's `finally` would wait for the GC).
Stream = tuple[AsyncIterator[str], Callable[[], None]]


async def _collect(
    gen: Generation, disconnected: asyncio.Event
) -> tuple[dict[int, str], dict[int, list[tuple[str, float]]], dict[int, str]]:
    """A non-streaming generation's whole text, logprobs and finish reason per choice index."""
    parts: dict[int, list[str]] = {i: [] for i in range(len(gen.requests))}
    logprobs: dict[int, list[tuple[str, float]]] = {i: [] for i in range(len(gen.requests))}
    reasons: dict[int, str] = {}
    async for index, event in _until_disconnected(gen, disconnected):
        if isinstance(event, Delta):
            parts[index].append(event.text)
            logprobs[index].extend(event.tokens)
        else:
            reasons[index] = event.finish_reason
    return {i: "".join(t) for i, t in parts.items()}, logprobs, reasons


async def _until_disconnected(
    gen: Generation, disconnected: asyncio.Event
) -> AsyncIterator[tuple[int, Delta | Finished]]:
    """Events of a non-streaming generation; a client that goes away cancels it."""
    events = gen.events()
    watcher = asyncio.ensure_future(disconnected.wait())
    try:
        while True:
            nxt = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                gen.cancel()
                raise ClientClosed("the client disconnected; its request was cancelled")
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        watcher.cancel()
        gen.cancel()


def _completion_logprobs(tokens: list[tuple[str, float]], top: int | None, offset: int) -> p.CompletionLogprobs:
    offsets = []
    for tok, _ in tokens:
        offsets.append(offset)
        offset += len(tok)
    return p.CompletionLogprobs(
        tokens=[t for t, _ in tokens],
        token_logprobs=[lp for _, lp in tokens],
        top_logprobs=[{t: lp} if top else {} for t, lp in tokens],
        text_offset=offsets,
    )


def _chat_logprobs(tokens: list[tuple[str, float]]) -> p.ChatChoiceLogprobs:
    return p.ChatChoiceLogprobs([p.ChatLogprob(t, lp, list(t.encode()), []) for t, lp in tokens])


def error_body(e: ServingError) -> p.ErrorBody:
    return p.ErrorBody(p.ErrorInfo(e.message, e.type, e.param, e.code))


def error_frame(e: ServingError, metrics: Metrics, model: str) -> str:
    metrics.errors.labels(model, e.code or "error").inc()
    return msgspec.json.encode(error_body(e)).decode()

"""Completions and chat completions: one path from a protocol request to engine requests and back.

`Service.answer` (a whole response) and `Service.stream` (its chunks) route, tokenize, submit and read
the engine's events the same way for both endpoints; what differs between them (how a prompt is
tokenized, the shapes of a choice and a chunk) is a small class each, `_CompletionCall` and
`_ChatCall`. The service knows nothing of HTTP: the handlers cancel an answer whose client left and
turn chunks into server-sent events (serving/sse.py).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from serving import protocol as p
from serving.engine import Engine, Request
from serving.engine_core import Delta, Failed, Finished
from serving.errors import EngineClosed, EngineFailure, InvalidParameter
from serving.metrics import Metrics
from serving.registry import Registry, Route
from serving.stops import StopText

# A retired engine refuses new requests: look the name up again this many times.
_ROUTE_ATTEMPTS = 3

Req = TypeVar("Req", p.CompletionRequest, p.ChatCompletionRequest)
Logprobs = list[tuple[str, float]]  # (token text, logprob) per generated token


@dataclass
class Generation:
    """The engine requests of one HTTP request (prompts x n choices), read as one stream of events."""

    route: Route
    prompts: list[str]  # the prompt texts (as rendered, for chat)
    requests: list[Request]
    prompt_tokens: int
    started: float
    stop: Callable[[], StopText] | None = None  # a new cutter per choice, when the request has stop strings
    completion_tokens: dict[int, int] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """The version that answers, as OpenAI's system_fingerprint: "name/version"."""
        return self.route.entry.path

    @property
    def usage(self) -> p.Usage:
        completion = sum(self.completion_tokens.values())
        return p.Usage(self.prompt_tokens, completion, self.prompt_tokens + completion)

    def cancel(self) -> None:
        for r in self.requests:
            self.route.engine.cancel(r)

    async def events(self) -> AsyncIterator[tuple[int, Delta | Finished]]:
        """Each choice's text as it comes (cut at its first stop string), then its end."""
        queue = self.requests[0].events
        left = len(self.requests)
        cutters = {r.index: self.stop() for r in self.requests} if self.stop else {}
        while left:
            index, event = await queue.get()
            if isinstance(event, Failed):
                self.cancel()
                raise EngineFailure(f"{self.route.name}: {event.message}")
            cut = cutters.get(index)
            if isinstance(event, Delta):
                if cut is not None:
                    event = Delta(cut.feed(event.text), event.tokens)
                if event.text or event.tokens:
                    yield index, event
                continue
            left -= 1
            self.completion_tokens[index] = event.completion_tokens
            if cut is not None and (rest := cut.flush()):
                yield index, Delta(rest, [])
            yield index, event


class _Call(ABC, Generic[Req]):
    """One request to one endpoint: what differs between completions and chat."""

    endpoint: ClassVar[str]  # the metrics' label
    id_prefix: ClassVar[str]

    def __init__(self, req: Req) -> None:
        self.req = req
        self.id = p.new_id(self.id_prefix)
        self.created = p.now()

    @abstractmethod
    def tokenize(self, engine: Engine) -> tuple[list[str], list[list[int]]]:
        """The prompt texts and their token ids (blocking: runs in a worker thread)."""

    @abstractmethod
    def response(
        self, gen: Generation, texts: dict[int, str], logprobs: dict[int, Logprobs], reasons: dict[int, str]
    ) -> msgspec.Struct:
        """The whole answer of a non-streaming request."""

    @abstractmethod
    def prelude(self, gen: Generation) -> list[msgspec.Struct]:
        """The chunks a stream starts with, before any token."""

    @abstractmethod
    def delta(self, gen: Generation, index: int, event: Delta) -> msgspec.Struct:
        """The chunk carrying new text of choice `index`."""

    @abstractmethod
    def finish(self, gen: Generation, index: int, reason: str) -> msgspec.Struct:
        """The chunk ending choice `index`."""

    @abstractmethod
    def usage(self, gen: Generation) -> msgspec.Struct:
        """The chunk with the usage, after every choice's end (stream_options.include_usage)."""


class _CompletionCall(_Call[p.CompletionRequest]):
    endpoint = "completions"
    id_prefix = "cmpl"

    def __init__(self, req: p.CompletionRequest) -> None:
        super().__init__(req)
        self._offsets: dict[int, int] = {}  # per choice: the text streamed so far, for logprobs' text_offset

    def tokenize(self, engine: Engine) -> tuple[list[str], list[list[int]]]:
        prompts = self.req.prompts
        return prompts, [list(engine.tokenizer.encode(t).input_ids.data[0]) for t in prompts]

    def _logprobs(self, tokens: Logprobs, offset: int) -> p.CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        offsets = []
        for tok, _ in tokens:
            offsets.append(offset)
            offset += len(tok)
        return p.CompletionLogprobs(
            tokens=[t for t, _ in tokens],
            token_logprobs=[lp for _, lp in tokens],
            top_logprobs=[{t: lp} if self.req.logprobs else {} for t, lp in tokens],
            text_offset=offsets,
        )

    def _echo(self, gen: Generation, index: int) -> str:
        return gen.prompts[index // self.req.n] if self.req.echo else ""

    def response(
        self, gen: Generation, texts: dict[int, str], logprobs: dict[int, Logprobs], reasons: dict[int, str]
    ) -> p.Completion:
        choices = []
        for index in range(len(gen.requests)):
            prefix = self._echo(gen, index)
            lp = self._logprobs(logprobs[index], len(prefix))
            choices.append(p.CompletionChoice(index, prefix + texts[index], lp, reasons[index]))  # type: ignore[arg-type]
        return p.Completion(
            self.id, self.created, self.req.model, choices, gen.usage, system_fingerprint=gen.fingerprint
        )

    def _chunk(
        self, gen: Generation, choices: list[p.CompletionChoice], usage: p.Usage | None = None
    ) -> p.CompletionChunk:
        return p.CompletionChunk(
            self.id, self.created, self.req.model, choices, usage=usage, system_fingerprint=gen.fingerprint
        )

    def prelude(self, gen: Generation) -> list[msgspec.Struct]:
        if not self.req.echo:
            return []
        echoed = [p.CompletionChoice(i, self._echo(gen, i), None, None) for i in range(len(gen.requests))]
        return [self._chunk(gen, [choice]) for choice in echoed]

    def delta(self, gen: Generation, index: int, event: Delta) -> p.CompletionChunk:
        offset = self._offsets.get(index, 0)
        lp = self._logprobs(event.tokens, offset)
        self._offsets[index] = offset + len(event.text)
        return self._chunk(gen, [p.CompletionChoice(index, event.text, lp, None)])

    def finish(self, gen: Generation, index: int, reason: str) -> p.CompletionChunk:
        return self._chunk(gen, [p.CompletionChoice(index, "", None, reason)])  # type: ignore[arg-type]

    def usage(self, gen: Generation) -> p.CompletionChunk:
        return self._chunk(gen, [], gen.usage)


class _ChatCall(_Call[p.ChatCompletionRequest]):
    endpoint = "chat/completions"
    id_prefix = "chatcmpl"

    def tokenize(self, engine: Engine) -> tuple[list[str], list[list[int]]]:
        try:
            text = engine.tokenizer.apply_chat_template(self.req.history(), add_generation_prompt=True)
            # The template writes the BOS itself (as HF's apply_chat_template(tokenize=True) does not add one).
            ids = list(engine.tokenizer.encode(text, add_special_tokens=False).input_ids.data[0])
        except Exception as e:
            raise InvalidParameter(
                f"the model's chat template cannot render these messages: {e}", param="messages"
            ) from None
        return [text], [ids]

    def _logprobs(self, tokens: Logprobs) -> p.ChatChoiceLogprobs | None:
        if not self.req.logprobs:
            return None
        return p.ChatChoiceLogprobs([p.ChatLogprob(t, lp, list(t.encode()), []) for t, lp in tokens])

    def response(
        self, gen: Generation, texts: dict[int, str], logprobs: dict[int, Logprobs], reasons: dict[int, str]
    ) -> p.ChatCompletion:
        choices = [
            p.ChatChoice(i, p.AssistantMessage(texts[i]), self._logprobs(logprobs[i]), reasons[i])  # type: ignore[arg-type]
            for i in range(len(gen.requests))
        ]
        return p.ChatCompletion(
            self.id, self.created, self.req.model, choices, gen.usage, system_fingerprint=gen.fingerprint
        )

    def _chunk(
        self, gen: Generation, choices: list[p.ChatChunkChoice], usage: p.Usage | None = None
    ) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(
            self.id, self.created, self.req.model, choices, usage=usage, system_fingerprint=gen.fingerprint
        )

    def prelude(self, gen: Generation) -> list[msgspec.Struct]:
        role = p.ChatDelta(role="assistant", content="")
        return [self._chunk(gen, [p.ChatChunkChoice(i, role, None, None)]) for i in range(len(gen.requests))]

    def delta(self, gen: Generation, index: int, event: Delta) -> p.ChatCompletionChunk:
        choice = p.ChatChunkChoice(index, p.ChatDelta(content=event.text), self._logprobs(event.tokens), None)
        return self._chunk(gen, [choice])

    def finish(self, gen: Generation, index: int, reason: str) -> p.ChatCompletionChunk:
        return self._chunk(gen, [p.ChatChunkChoice(index, p.ChatDelta(), None, reason)])  # type: ignore[arg-type]

    def usage(self, gen: Generation) -> p.ChatCompletionChunk:
        return self._chunk(gen, [], gen.usage)


def _call_for(req: p.CompletionRequest | p.ChatCompletionRequest) -> _Call:
    return _CompletionCall(req) if isinstance(req, p.CompletionRequest) else _ChatCall(req)


# A stream's chunks, and what cancels its generation: the HTTP layer calls it once the response is
# over, a disconnect included (an abandoned async generator's `finally` would wait for the GC).
Stream = tuple[AsyncIterator[msgspec.Struct], Callable[[], None]]


class Service:
    """Drives the engines for the HTTP handlers and records the metrics of what they serve."""

    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics

    async def answer(self, req: p.CompletionRequest | p.ChatCompletionRequest) -> Coroutine[Any, Any, msgspec.Struct]:
        """Start generating (errors here are HTTP errors), then return the whole response to await.

        Cancelling that (its client went away) cancels the generation in the engine.
        """
        call = _call_for(req)
        gen = await self._start(call)
        return self._whole(call, gen)

    async def _whole(self, call: _Call, gen: Generation) -> msgspec.Struct:
        texts: dict[int, list[str]] = {i: [] for i in range(len(gen.requests))}
        logprobs: dict[int, Logprobs] = {i: [] for i in range(len(gen.requests))}
        reasons: dict[int, str] = {}
        try:
            async for index, event in gen.events():
                if isinstance(event, Delta):
                    texts[index].append(event.text)
                    logprobs[index].extend(event.tokens)
                else:
                    reasons[index] = event.finish_reason
        finally:
            gen.cancel()  # cancelled or failed: the engine drops what is left (a finished request is a no-op)
        self._record(gen, call.endpoint)
        return call.response(gen, {i: "".join(t) for i, t in texts.items()}, logprobs, reasons)

    async def stream(self, req: p.CompletionRequest | p.ChatCompletionRequest) -> Stream:
        """Start generating (errors here are HTTP errors), then return the chunks and a canceller.

        An error after the start is raised from the chunks' iterator, for the HTTP layer to send as an error frame.
        """
        call = _call_for(req)
        gen = await self._start(call)

        async def chunks() -> AsyncIterator[msgspec.Struct]:
            for chunk in call.prelude(gen):
                yield chunk
            async for index, event in gen.events():
                yield call.delta(gen, index, event) if isinstance(event, Delta) else call.finish(
                    gen, index, event.finish_reason
                )
            if req.include_usage_in_stream:
                yield call.usage(gen)
            self._record(gen, call.endpoint)

        return chunks(), gen.cancel

    async def _start(self, call: _Call) -> Generation:
        """Route, tokenize and submit; a retired engine (a reload in between) is retried on the new route."""
        req = call.req
        for attempt in range(_ROUTE_ATTEMPTS):
            route = self.registry.route(req.model)
            engine = route.engine
            prompts, ids = await asyncio.to_thread(call.tokenize, engine)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            requests = [
                Request(
                    prompt_ids=x,
                    config=req.to_generation_config(
                        engine.info.generation_config(),
                        prompt_tokens=len(x),
                        context_length=engine.info.context_length,
                        choice_index=j,
                        logprobs=1 if req.logprobs else 0,
                    ),
                    adapter=route.adapter,
                    loop=loop,
                    events=queue,
                    index=i * req.n + j,
                    want_logprobs=req.wants_logprobs,
                    stream=req.stream,
                )
                for i, x in enumerate(ids)
                for j in range(req.n)
            ]
            submitted: list[Request] = []
            try:
                for r in requests:
                    engine.submit(r)
                    submitted.append(r)
            except EngineClosed:
                for r in submitted:
                    engine.cancel(r)
                if attempt == _ROUTE_ATTEMPTS - 1:
                    raise
                continue
            except BaseException:
                for r in submitted:
                    engine.cancel(r)
                raise
            stops, include = req.stop_strings, req.include_stop_str_in_output
            stop = partial(StopText, stops, include=include) if stops else None
            return Generation(route, prompts, requests, sum(len(x) for x in ids), time.monotonic(), stop)
        raise AssertionError("unreachable")

    def _record(self, gen: Generation, endpoint: str) -> None:
        model = gen.route.name
        done = time.monotonic()
        self.metrics.requests.labels(model, endpoint, "200").inc()
        self.metrics.prompt_tokens.labels(model).inc(gen.prompt_tokens)
        self.metrics.completion_tokens.labels(model).inc(sum(gen.completion_tokens.values()))
        firsts = [r.first_token_at for r in gen.requests if r.first_token_at is not None]
        self.metrics.ttft.labels(model).observe((min(firsts) if firsts else done) - gen.started)
        self.metrics.latency.labels(model).observe(done - gen.started)


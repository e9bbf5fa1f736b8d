"""The Litestar application: thin controllers over the service, one error renderer, health, metrics, auth."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from litestar import Controller, Litestar, MediaType, Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.params import FromPath, JSONBody
from litestar.response import ServerSentEvent
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving import protocol as p
from serving.engine import Engine, load_engine
from serving.engine_core import EngineSettings
from serving.errors import (
    EngineFailure,
    InvalidParameter,
    MethodNotAllowed,
    NotReady,
    PayloadTooLarge,
    RouteNotFound,
    ServingError,
    Unauthorized,
)
from serving.metrics import Metrics
from serving.registry import Registry
from serving.service import Service, error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    repository: Path
    api_key: str | None = field(default=None, repr=False)  # never printed
    max_body_bytes: int = 4 * 1024 * 1024
    poll_interval: float = 2.0
    engine: EngineSettings = field(default_factory=EngineSettings)


# ---- errors: raised anywhere, rendered here once ----

_FIELD_IN_MESSAGE = re.compile(r"(unknown|missing required) field `([^`]+)`")
_ENDPOINTS = ("completions", "chat/completions", "models", "config", "health", "metrics")


def _endpoint(path: str) -> str:
    for e in _ENDPOINTS:
        if e in path:
            return e
    return "other"


def _as_serving_error(exc: Exception) -> ServingError:
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, UnicodeDecodeError):  # raised while the body is decoded
        return InvalidParameter(f"the body is not valid UTF-8: {exc.reason} at byte {exc.start}")
    if isinstance(exc, RecursionError):
        return InvalidParameter("the body nests JSON arrays or objects too deeply")
    if isinstance(exc, ValidationException):
        extra = exc.extra if isinstance(exc.extra, list) else []
        first = extra[0] if extra and isinstance(extra[0], dict) else {}
        key = first.get("key") or ""
        message = first.get("message") or str(exc.detail)
        if not extra:
            return InvalidParameter(f"the body is not valid JSON: {exc.detail}")
        # msgspec names the field in backticks; Litestar's key is the path to the object ("data" is the body).
        named = _FIELD_IN_MESSAGE.search(message)
        path = key.removeprefix("data").lstrip(".")
        param = ".".join(x for x in (path, named.group(2) if named else "") if x) or None
        if named and named.group(1) == "unknown":
            message = f"unsupported parameter {param!r}: this server does not implement it"
        elif named:
            message = f"missing required parameter {param!r}"
        elif param:
            message = f"invalid value for {param!r}: {message}"
        else:
            message = f"invalid request body: {message}"
        return InvalidParameter(message, param=param)
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return RouteNotFound(f"no route for this path: {exc.detail}")
        if exc.status_code == 405:
            return MethodNotAllowed(str(exc.detail))
        if exc.status_code == 413:
            return PayloadTooLarge(f"the request body is larger than the server's limit: {exc.detail}")
        if exc.status_code == 401:
            return Unauthorized(str(exc.detail))
        if exc.status_code < 500:
            return InvalidParameter(str(exc.detail))
    log.exception("unexpected error", exc_info=exc)
    return EngineFailure("internal server error")


def render_error(request: Request, exc: Exception) -> Response[p.ErrorBody]:
    error = _as_serving_error(exc)
    metrics: Metrics = request.app.state.metrics
    model = getattr(request.state, "model", "") or ""
    metrics.requests.labels(model, _endpoint(request.url.path), str(error.status_code)).inc()
    metrics.errors.labels(model, error.code or "error").inc()
    return Response(error_body(error), status_code=error.status_code, headers=error.headers)


# ---- auth ----


def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Bearer API key on /v1 and /v3 when one is configured; compared in constant time, never logged."""
    expected: str | None = connection.app.state.settings.api_key
    if expected is None:
        return
    if not api_key_matches(connection.headers.get("authorization", ""), expected):
        raise Unauthorized("a valid API key is required as 'Authorization: Bearer <key>'")


def api_key_matches(authorization: str, expected: str) -> bool:
    """Whether an Authorization header carries `expected` as a Bearer token.

    In constant time: how long it takes does not depend on where the token first differs from the key
    (an ordinary == returns at the first differing byte, and so tells an attacker the key's prefix).
    """
    scheme, _, token = authorization.partition(" ")
    same = hmac.compare_digest(token.strip().encode(), expected.encode())
    return scheme.lower() == "bearer" and same


# ---- controllers ----


class EventStream(ServerSentEvent):
    """Litestar's SSE response, keeping text/event-stream even from a handler whose media type is JSON,
    and calling `on_close` once the body is over however it ended: finished, client gone, send failed.

    (Litestar runs a response's background task only after a clean end, and an abandoned async
    generator's `finally` waits for the garbage collector: neither cancels a disconnected generation.)
    """

    def __init__(self, content: AsyncIterator[str], *, on_close: Callable[[], None]) -> None:
        super().__init__(content)
        self.on_close = on_close

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = self.media_type
        return _ClosingResponse(super().to_asgi_response(*args, **kwargs), self.on_close)


@dataclass(frozen=True)
class _ClosingResponse:
    """An ASGI response that calls `on_close` after the wrapped one, whether it ended or raised."""

    inner: Any
    on_close: Callable[[], None]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            self.on_close()


def provide_service(state: State) -> Service:
    return state.service


@contextlib.asynccontextmanager
async def _disconnect_watch(request: Request) -> AsyncIterator[asyncio.Event]:
    """An event set when the client of a non-streaming request goes away (the body is already read)."""
    gone = asyncio.Event()

    async def listen() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return

    task = asyncio.create_task(listen())
    try:
        yield gone
    finally:
        task.cancel()


# The errors each endpoint can answer, documented in the shape they really have.
_ERRORS = {
    status: ResponseSpec(data_container=p.ErrorBody, description=description)
    for status, description in {
        400: "a bad parameter, named in error.param",
        401: "a missing or wrong API key",
        404: "an unknown model (the message lists the served ones)",
        413: "a body over the limit",
        503: "not ready, or the queue is full (see Retry-After)",
    }.items()
}


class OpenAIController(Controller):
    """OpenAI's endpoints; registered under /v3 (OVMS's prefix) and /v1 (OpenAI's)."""

    dependencies = {"service": Provide(provide_service, sync_to_thread=False)}  # noqa: RUF012

    @post("/completions", status_code=200, responses=_ERRORS)
    async def completions(
        self, data: JSONBody[p.CompletionRequest], service: NamedDependency[Service], request: Request
    ) -> p.Completion:
        request.state.model = data.model
        data.check()
        if data.stream:
            frames, cancel = await service.stream_completion(data)
            return EventStream(frames, on_close=cancel)  # type: ignore[return-value]
        async with _disconnect_watch(request) as gone:
            return await service.completion(data, gone)

    @post("/chat/completions", status_code=200, responses=_ERRORS)
    async def chat_completions(
        self, data: JSONBody[p.ChatCompletionRequest], service: NamedDependency[Service], request: Request
    ) -> p.ChatCompletion:
        request.state.model = data.model
        data.check()
        if data.stream:
            frames, cancel = await service.stream_chat(data)
            return EventStream(frames, on_close=cancel)  # type: ignore[return-value]
        async with _disconnect_watch(request) as gone:
            return await service.chat(data, gone)

    @get("/models", responses=_ERRORS)
    async def models(self, service: NamedDependency[Service]) -> p.ModelList:
        registry = service.registry
        if not registry.ready:
            raise NotReady("the server is still loading its models")
        return p.ModelList([_card(registry, r.entry, _numerics(r.engine)) for _, r in sorted(registry.table.items())])

    @get("/models/{model_id:str}", responses=_ERRORS)
    async def model(self, model_id: FromPath[str], service: NamedDependency[Service]) -> p.ModelCard:
        route = service.registry.route(model_id)
        return _card(service.registry, route.entry, numerics=_numerics(route.engine))


def _card(registry: Registry, entry: Any, numerics: p.ModelNumerics | None = None) -> p.ModelCard:
    return p.ModelCard(
        id=entry.name,
        created=registry.created(entry),
        owned_by="lora-pipeline",
        root=entry.base or entry.name,
        parent=entry.base if entry.kind == "adapter" else None,
        numerics=numerics,
    )


def _numerics(engine: Engine) -> p.ModelNumerics:
    """An engine's pinned and effective numerics (an adapter's are its base engine's)."""
    pinned = engine.info.numerics
    return p.ModelNumerics(
        pinned=msgspec.convert(pinned.to_json(), p.NumericsInfo) if pinned else None,
        effective=msgspec.convert(engine.effective.to_json(), p.NumericsInfo),
    )


class ConfigController(Controller):
    """OVMS's config API: what is loaded at which version, and a reload on demand."""

    path = "/config"
    dependencies = {"service": Provide(provide_service, sync_to_thread=False)}  # noqa: RUF012

    @get("/")
    async def config(self, service: NamedDependency[Service]) -> dict[str, Any]:
        return _config_status(service.registry)

    @post("/reload", status_code=200)
    async def reload(self, service: NamedDependency[Service]) -> dict[str, Any]:
        await service.registry.reload(force=True)
        return _config_status(service.registry)


def _config_status(registry: Registry) -> dict[str, Any]:
    """OVMS's shape: {name: {"model_version_status": [{"version", "state", "status": {...}}]}}."""
    out: dict[str, Any] = {}
    for name, route in sorted(registry.table.items()):
        out[name] = {
            "model_version_status": [
                {
                    "version": str(route.entry.version),
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": "OK"},
                }
            ],
            "kind": route.entry.kind,
            "base": route.entry.base,
            "numerics": msgspec.to_builtins(_numerics(route.engine)),
        }
    for name, f in sorted(registry.failures.items()):
        status = {
            "version": str(f.version),
            "state": "END",
            "status": {"error_code": "UNKNOWN", "error_message": f.message},
        }
        out.setdefault(name, {"model_version_status": []})["model_version_status"].append(status)
    return out


@get("/v2/health/live", sync_to_thread=False)
def live() -> dict[str, str]:
    return {"status": "live"}


@get("/v2/health/ready")
async def ready(request: Request) -> dict[str, Any]:
    registry: Registry = request.app.state.registry
    if not registry.ready:
        raise NotReady("the server is still loading its models")
    return {
        "status": "ready",
        "generation": registry.generation,
        "models": {n: r.entry.version for n, r in sorted(registry.table.items())},
        "failures": {n: {"version": f.version, "error": f.message} for n, f in sorted(registry.failures.items())},
    }


@get("/metrics", media_type=MediaType.TEXT, sync_to_thread=False)
def metrics(request: Request) -> Response[bytes]:
    m: Metrics = request.app.state.metrics
    return Response(generate_latest(m.prometheus), media_type=CONTENT_TYPE_LATEST)


# ---- the app ----


def create_app(settings: Settings, *, loader: Callable[..., Engine] = load_engine) -> Litestar:
    """The server for one repository; the lifespan loads its models and watches it.

    `loader` builds an engine for a version folder; tests of the HTTP layer pass a fake one.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        registry = Registry(settings.repository, settings.engine, settings.poll_interval, loader)
        metrics_ = Metrics()
        metrics_.watch(registry)
        app.state.registry = registry
        app.state.metrics = metrics_
        app.state.service = Service(registry, metrics_)
        app.state.settings = settings
        await registry.open()
        try:
            yield
        finally:
            await registry.close()

    guards = [require_api_key]
    app = Litestar(
        route_handlers=[
            Router("/v3", route_handlers=[OpenAIController], guards=guards),
            Router("/v1", route_handlers=[OpenAIController, ConfigController], guards=guards),
            live,
            ready,
            metrics,
        ],
        lifespan=[lifespan],
        exception_handlers={Exception: render_error},
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="lora-pipeline serving", version="1.0.0", path="/schema"),
        logging_config=None,
    )
    _document_zero_bounds(app, [p.CompletionRequest, p.ChatCompletionRequest])
    return app


_BOUNDS = {"minimum": "minimum", "exclusiveMinimum": "exclusive_minimum"}


def _document_zero_bounds(app: Litestar, structs: list[type]) -> None:
    """Put back the zero bounds (temperature >= 0, top_p > 0, ...) that Litestar drops from the schema.

    Litestar copies a bound only when it is truthy; msgspec's own schema of the same structs has them all.
    """
    schemas = app.openapi_schema.components.schemas
    _, components = msgspec.json.schema_components(structs)
    for name, component in components.items():
        if name not in schemas:
            continue
        for prop, schema in component.get("properties", {}).items():
            target = (schemas[name].properties or {}).get(prop)
            for option in schema.get("anyOf", [schema]):
                for key, attr in _BOUNDS.items():
                    if target is not None and key in option and getattr(target, attr) is None:
                        setattr(target, attr, option[key])

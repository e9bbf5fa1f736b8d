"""OpenAI's endpoints (/v3 and /v1) and OVMS's config API: thin handlers over the service and the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, JSONBody

from serving import protocol as p
from serving.disconnect import unless_disconnected
from serving.engine import Engine
from serving.error_handlers import count_error
from serving.errors import NotReady
from serving.metrics import Metrics
from serving.registry import Registry, Route
from serving.service import Service
from serving.sse import EventStream, data_lines

# The errors each endpoint can answer, documented in the shape they really have.
ERRORS = {
    status: ResponseSpec(data_container=p.ErrorBody, description=description)
    for status, description in {
        400: "a bad parameter, named in error.param",
        401: "a missing or wrong API key",
        404: "an unknown model (the message lists the served ones)",
        413: "a body over the limit",
        503: "not ready, or the queue is full (see Retry-After)",
    }.items()
}


@dataclass(frozen=True)
class Responder:
    """What the completion handlers share: the answer, or with `stream` its server-sent events.

    (Both documented in the OpenAPI schema: serving/openapi.py.)
    """

    service: Service
    metrics: Metrics  # a stream's error frame is counted here

    async def __call__(self, req: p.CompletionRequest | p.ChatCompletionRequest, request: Request) -> Any:
        request.state.model = req.model
        req.check()
        if req.stream:
            chunks, cancel = await self.service.stream(req)
            lines = data_lines(chunks, on_error=lambda e: count_error(self.metrics, req.model, e))
            return EventStream(lines, on_close=cancel)
        # Watched once submitted: a client gone earlier is noticed then, and its requests are cancelled in the engine.
        return await unless_disconnected(request, await self.service.answer(req))


class OpenAIController(Controller):
    """OpenAI's endpoints; registered under /v3 (OVMS's prefix) and /v1 (OpenAI's)."""

    @post("/completions", status_code=200, responses=ERRORS)
    async def completions(
        self, data: JSONBody[p.CompletionRequest], respond: NamedDependency[Responder], request: Request
    ) -> p.Completion | EventStream:
        return await respond(data, request)

    @post("/chat/completions", status_code=200, responses=ERRORS)
    async def chat_completions(
        self, data: JSONBody[p.ChatCompletionRequest], respond: NamedDependency[Responder], request: Request
    ) -> p.ChatCompletion | EventStream:
        return await respond(data, request)

    @get("/models", responses=ERRORS)
    async def models(self, registry: NamedDependency[Registry]) -> p.ModelList:
        if not registry.ready:
            raise NotReady("the server is still loading its models")
        return p.ModelList([await _card(registry, route) for _, route in sorted(registry.table.items())])

    @get("/models/{model_id:str}", responses=ERRORS)
    async def model(self, model_id: FromPath[str], registry: NamedDependency[Registry]) -> p.ModelCard:
        return await _card(registry, registry.route(model_id))

    @get("/models/{model_id:str}/manifest", responses=ERRORS)
    async def manifest(self, model_id: FromPath[str], registry: NamedDependency[Registry]) -> p.ModelManifest:
        """The live version's manifest: its sources and revisions, build, numerics and validation report."""
        entry = registry.route(model_id).entry
        return p.ModelManifest(id=entry.name, version=entry.version, kind=entry.kind,
                               manifest=await registry.manifest(entry))


async def _card(registry: Registry, route: Route) -> p.ModelCard:
    entry = route.entry
    return p.ModelCard(
        id=entry.name,
        created=registry.created(entry),
        owned_by="lora-pipeline",
        root=entry.base or entry.name,
        parent=entry.base if entry.kind == "adapter" else None,
        numerics=_numerics(route.engine),
        kind=entry.kind,
        version=entry.version,
        weight_format=(await registry.manifest(entry)).get("weight_format"),
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

    @get("/")
    async def config(self, registry: NamedDependency[Registry]) -> dict[str, Any]:
        return _config_status(registry)

    @post("/reload", status_code=200)
    async def reload(self, registry: NamedDependency[Registry]) -> dict[str, Any]:
        await registry.reload(force=True)
        return _config_status(registry)


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

"""The Litestar application for one repository: its routes, the dependencies its handlers take, its lifespan.

The jobs live in modules of their own: controllers.py and health.py (the handlers), auth.py (the
API key), error_handlers.py (every error rendered once), sse.py (streams), disconnect.py
(abandoned answers), openapi.py (the schema as the server really answers), page.py (the compare page at /).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from modelrepo import is_object_store
from modelrepo.mirror import Mirror
from serving import health, openapi
from serving.auth import api_key_guard
from serving.controllers import ConfigController, OpenAIController, Responder
from serving.engine import Engine, load_engine
from serving.engine_core import EngineSettings
from serving.error_handlers import EXCEPTION_HANDLERS
from serving.metrics import Metrics
from serving.page import page_routes
from serving.registry import Registry
from serving.service import Service

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-serve"


@dataclass(frozen=True)
class Settings:
    repository: Path | str  # a folder, or s3://bucket/prefix (served from a local copy under cache_dir)
    api_key: str | None = field(default=None, repr=False)  # never printed
    max_body_bytes: int = 4 * 1024 * 1024
    poll_interval: float = 2.0
    cache_dir: Path = DEFAULT_CACHE
    engine: EngineSettings = field(default_factory=EngineSettings)


def _provide_registry(state: State) -> Registry:
    return state.registry


def _provide_metrics(state: State) -> Metrics:
    return state.metrics


def _provide_responder(state: State) -> Responder:
    return state.responder


def create_app(settings: Settings, *, loader: Callable[..., Engine] = load_engine) -> Litestar:
    """The server for one repository; the lifespan loads its models and watches it.

    `loader` builds an engine for a version folder; tests of the HTTP layer pass a fake one.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if is_object_store(settings.repository):
            mirror = Mirror(str(settings.repository), settings.cache_dir)
            registry = Registry(mirror.root, settings.engine, settings.poll_interval, loader, mirror)
        else:
            registry = Registry(Path(settings.repository), settings.engine, settings.poll_interval, loader)
        metrics = Metrics()
        metrics.watch(registry)
        app.state.registry = registry
        app.state.metrics = metrics  # the error handlers read it here: they take no dependencies
        app.state.responder = Responder(Service(registry, metrics), metrics)
        await registry.open()
        try:
            yield
        finally:
            await registry.close()

    guards = [api_key_guard(settings.api_key)] if settings.api_key is not None else []
    app = Litestar(
        route_handlers=[
            Router("/v3", route_handlers=[OpenAIController], guards=guards),
            Router("/v1", route_handlers=[OpenAIController, ConfigController], guards=guards),
            health.live,
            health.ready,
            health.metrics,
            *page_routes(),  # the compare page at /: no API key (it asks for one and sends it on its own calls)
        ],
        dependencies={
            "registry": Provide(_provide_registry, sync_to_thread=False),
            "metrics": Provide(_provide_metrics, sync_to_thread=False),
            "respond": Provide(_provide_responder, sync_to_thread=False),
        },
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="lora-pipeline serving", version="1.0.0", path="/schema"),
        logging_config=None,
    )
    openapi.document(app)
    return app

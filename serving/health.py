"""Liveness, readiness (OVMS's /v2/health paths) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from litestar import MediaType, Response, get
from litestar.di import NamedDependency
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.errors import NotReady
from serving.metrics import Metrics
from serving.registry import Registry


@get("/v2/health/live", sync_to_thread=False)
def live() -> dict[str, str]:
    return {"status": "live"}


@get("/v2/health/ready")
async def ready(registry: NamedDependency[Registry]) -> dict[str, Any]:
    if not registry.ready:
        raise NotReady("the server is still loading its models")
    body: dict[str, Any] = {
        "status": "ready",
        "generation": registry.generation,
        "models": {n: r.entry.version for n, r in sorted(registry.table.items())},
        "failures": {n: {"version": f.version, "error": f.message} for n, f in sorted(registry.failures.items())},
        "staged": {
            n: {"version": s.version, "ready": s.error is None, "error": s.error} for n, s in registry.staged.items()
        },
    }
    mirror = registry.mirror
    if mirror is not None:  # served from a copy of a bucket: say how current the copy is; stale still serves
        age = mirror.age()
        body["store"] = {
            "location": mirror.location,
            "stale": mirror.stale,
            "last_sync_age_seconds": None if age is None else round(age, 3),
            "error": mirror.error,
        }
    return body


@get("/metrics", media_type=MediaType.TEXT, sync_to_thread=False)
def metrics(metrics: NamedDependency[Metrics]) -> Response[bytes]:
    return Response(generate_latest(metrics.prometheus), media_type=CONTENT_TYPE_LATEST)

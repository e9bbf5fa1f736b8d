"""Every error a request can end with, rendered once: OpenAI's error body, the error's status, counted in the metrics.

A `ServingError` carries its own status; the exceptions Litestar and the body decoder raise are
translated, one handler per type. An error in the middle of a stream is sent as a data frame by
serving/sse.py with the same body.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from serving import protocol as p
from serving.errors import (
    EngineFailure,
    InvalidParameter,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
    ServingError,
    Unauthorized,
)
from serving.metrics import Metrics

log = logging.getLogger(__name__)

_FIELD_IN_MESSAGE = re.compile(r"(unknown|missing required) field `([^`]+)`")
_ENDPOINTS = ("completions", "chat/completions", "models", "config", "health", "metrics")


def error_body(e: ServingError) -> p.ErrorBody:
    return p.ErrorBody(p.ErrorInfo(e.message, e.type, e.param, e.code))


def count_error(metrics: Metrics, model: str, e: ServingError) -> None:
    metrics.errors.labels(model, e.code or "error").inc()


def _endpoint(path: str) -> str:
    for e in _ENDPOINTS:
        if e in path:
            return e
    return "other"


def _render(request: Request, error: ServingError) -> Response[p.ErrorBody]:
    metrics: Metrics = request.app.state.metrics
    model = getattr(request.state, "model", "") or ""
    metrics.requests.labels(model, _endpoint(request.url.path), str(error.status_code)).inc()
    count_error(metrics, model, error)
    return Response(error_body(error), status_code=error.status_code, headers=error.headers)


def serving_error(request: Request, exc: ServingError) -> Response[p.ErrorBody]:
    return _render(request, exc)


def invalid_body(request: Request, exc: ValidationException) -> Response[p.ErrorBody]:
    """A body that is not JSON, or does not fit the request's schema: the parameter named as OpenAI names it."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    key = first.get("key") or ""
    message = first.get("message") or str(exc.detail)
    if not extra:
        return _render(request, InvalidParameter(f"the body is not valid JSON: {exc.detail}"))
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
    return _render(request, InvalidParameter(message, param=param))


_BY_STATUS: dict[int, Callable[[str], ServingError]] = {
    401: Unauthorized,
    404: lambda detail: RouteNotFound(f"no route for this path: {detail}"),
    405: MethodNotAllowed,
    413: lambda detail: PayloadTooLarge(f"the request body is larger than the server's limit: {detail}"),
}


def http_error(request: Request, exc: HTTPException) -> Response[p.ErrorBody]:
    """Litestar's own refusals (no route, wrong method, body too large, ...)."""
    make = _BY_STATUS.get(exc.status_code)
    if make is not None:
        return _render(request, make(str(exc.detail)))
    if exc.status_code < 500:
        return _render(request, InvalidParameter(str(exc.detail)))
    return unexpected(request, exc)


def undecodable_body(request: Request, exc: UnicodeDecodeError) -> Response[p.ErrorBody]:
    return _render(request, InvalidParameter(f"the body is not valid UTF-8: {exc.reason} at byte {exc.start}"))


def too_deep(request: Request, _: RecursionError) -> Response[p.ErrorBody]:
    return _render(request, InvalidParameter("the body nests JSON arrays or objects too deeply"))


def unexpected(request: Request, exc: Exception) -> Response[p.ErrorBody]:
    """A bug: logged with its traceback, answered as a 500 that shows none of it."""
    log.exception("unexpected error", exc_info=exc)
    return _render(request, EngineFailure("internal server error"))


EXCEPTION_HANDLERS = {
    ServingError: serving_error,
    ValidationException: invalid_body,
    HTTPException: http_error,
    UnicodeDecodeError: undecodable_body,
    RecursionError: too_deep,
    Exception: unexpected,
}

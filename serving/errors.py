"""The serving errors: one family, each carrying its HTTP status, rendered once in OpenAI's error shape."""

from __future__ import annotations

from typing import ClassVar


class ServingError(Exception):
    """An error a client sees: `status_code`, OpenAI's `type`, the offending `param` and a `code`."""

    status_code: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None) -> None:
        super().__init_subclass__()
        if status is not None:
            cls.status_code = status
            # OpenAI's two types: the request is at fault (4xx), or the server (5xx).
            cls.type = "invalid_request_error" if status < 500 else "server_error"
        if code is not None:
            cls.code = code

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidParameter(ServingError, status=400, code="invalid_parameter"):
    """A request parameter is missing, unknown, of the wrong type or out of range; `param` names it."""


class Unauthorized(ServingError, status=401, code="invalid_api_key"):
    """No API key, or not the server's."""


class ModelNotFound(ServingError, status=404, code="model_not_found"):
    """No served model by that name; the message lists those that are."""

    def __init__(self, name: str, available: list[str]) -> None:
        listed = ", ".join(sorted(available)) or "none"
        super().__init__(f"The model {name!r} does not exist; served models: {listed}", param="model")


class RouteNotFound(ServingError, status=404, code="not_found"):
    """No such path: rendered as the API's errors are, not as Litestar's."""


class MethodNotAllowed(ServingError, status=405, code="method_not_allowed"):
    """The path exists, not with that method."""


class PayloadTooLarge(ServingError, status=413, code="payload_too_large"):
    """The body is over the server's limit."""


class Overloaded(ServingError, status=503, code="overloaded"):
    """The engine's queue is full: come back after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NotReady(ServingError, status=503, code="not_ready"):
    """The model is loading (or its engine is gone): retry after a second."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class ClientClosed(ServingError, status=499, code="client_closed_request"):
    """The client went away before the answer (nginx's 499): nobody reads it, the metrics count it."""


class EngineFailure(ServingError, status=500, code="engine_error"):
    """The engine failed on a request that was valid: reported, never a stack trace."""


class EngineClosed(NotReady):
    """The engine was retired by a reload or its process stopped: the model is looked up again, then 503."""

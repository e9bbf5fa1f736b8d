"""The serving errors: one family, each carrying its HTTP status, rendered once in OpenAI's error shape."""

from __future__ import annotations

from typing import ClassVar


class ServingError(Exception):
    """An error a client sees: `status_code`, OpenAI's `type`, the offending `param` and a `code`."""

    status_code: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidParameter(ServingError):
    """A request parameter is missing, unknown, of the wrong type or out of range; `param` names it."""

    status_code = 400
    type = "invalid_request_error"
    code = "invalid_parameter"


class Unauthorized(ServingError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(ServingError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name: str, available: list[str]) -> None:
        listed = ", ".join(sorted(available)) or "none"
        super().__init__(f"The model {name!r} does not exist; served models: {listed}", param="model")


class RouteNotFound(ServingError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ServingError):
    status_code = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ServingError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(ServingError):
    """The engine's queue is full: come back after `retry_after` seconds."""

    status_code = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NotReady(ServingError):
    status_code = 503
    type = "server_error"
    code = "not_ready"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class ClientClosed(ServingError):
    """The client went away before the answer (nginx's 499): nobody reads it, the metrics count it."""

    status_code = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class EngineFailure(ServingError):
    """The engine failed on a request that was valid: reported, never a stack trace."""

    status_code = 500
    type = "server_error"
    code = "engine_error"


class EngineClosed(NotReady):
    """The engine was retired by a reload or its process stopped: the model is looked up again, then 503."""

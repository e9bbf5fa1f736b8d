"""The API key: when the server has one, /v1 and /v3 need it as a Bearer token."""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from serving.errors import Unauthorized


def api_key_matches(authorization: str, expected: str) -> bool:
    """Whether an Authorization header carries `expected` as a Bearer token.

    In constant time: how long it takes does not depend on where the token first differs from the key
    (an ordinary == returns at the first differing byte, and so tells an attacker the key's prefix).
    """
    scheme, _, token = authorization.partition(" ")
    same = hmac.compare_digest(token.strip().encode(), expected.encode())
    return scheme.lower() == "bearer" and same


def api_key_guard(expected: str) -> Guard:
    """A guard that refuses a request without `expected` as its Bearer token; the key is never logged."""

    def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if not api_key_matches(connection.headers.get("authorization", ""), expected):
            raise Unauthorized("a valid API key is required as 'Authorization: Bearer <key>'")

    return require_api_key

"""Server-sent events: a stream's chunks as data lines, its mid-stream error as a last frame, then [DONE]."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.response import ServerSentEvent

from serving.error_handlers import error_body
from serving.errors import ServingError


async def data_lines(
    chunks: AsyncIterator[msgspec.Struct], on_error: Callable[[ServingError], None]
) -> AsyncIterator[str]:
    """Each chunk as JSON; an error raised by the chunks (the headers are sent already) as an error frame."""
    try:
        async for chunk in chunks:
            yield msgspec.json.encode(chunk).decode()
    except ServingError as e:
        on_error(e)
        yield msgspec.json.encode(error_body(e)).decode()
    yield "[DONE]"


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

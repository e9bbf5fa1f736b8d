"""The compare page: GET / and its files under /static (plain HTML, CSS and JS: no build step, nothing from a CDN).

The page is not API: it is left out of the OpenAPI schema and needs no API key. It asks the person
for the key and sends it as a Bearer token on the /v3 calls it makes; the server stores nothing.
"""

from __future__ import annotations

from pathlib import Path

from litestar import MediaType, get
from litestar.response import File
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

STATIC = Path(__file__).resolve().parent / "static"


@get("/", include_in_schema=False, media_type=MediaType.HTML, sync_to_thread=False)
def index() -> File:
    return File(STATIC / "index.html", content_disposition_type="inline", media_type=MediaType.HTML)


def page_routes() -> list[ControllerRouterHandler]:
    """The page and its static files, for the app's route handlers."""
    return [index, create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False)]

"""The OpenAPI schema as the server really answers: the zero bounds Litestar drops, the streamed responses."""

from __future__ import annotations

import msgspec
from litestar import Litestar
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Reference, Schema

from serving import protocol as p

_BOUNDS = {"minimum": "minimum", "exclusiveMinimum": "exclusive_minimum"}
# With "stream": true, these endpoints answer text/event-stream: one chunk per data line, then [DONE].
_STREAMED = {"completions": p.CompletionChunk, "chat/completions": p.ChatCompletionChunk}


def document(app: Litestar) -> None:
    _document_zero_bounds(app, [p.CompletionRequest, p.ChatCompletionRequest])
    _document_event_streams(app)


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


def _document_event_streams(app: Litestar) -> None:
    """Add text/event-stream to the 200 answer of the endpoints that stream, each data line a chunk."""
    schema = app.openapi_schema
    components = schema.components.schemas
    # msgspec's schemas of the chunks, as plain JSON schema (Litestar writes a dict out as it is).
    _, missing = msgspec.json.schema_components(list(_STREAMED.values()), ref_template="#/components/schemas/{name}")
    for name, component in missing.items():
        components.setdefault(name, component)  # type: ignore[arg-type]
    for path, item in (schema.paths or {}).items():
        for endpoint, chunk in _STREAMED.items():
            if not path.endswith("/" + endpoint) or item.post is None or item.post.responses is None:
                continue
            ok = item.post.responses.get("200")
            if ok is None or isinstance(ok, Reference):
                continue
            ok.content = dict(ok.content or {})
            # The handler's return type is the JSON answer | EventStream; the stream is text/event-stream, not JSON.
            json_answer = ok.content.get("application/json")
            if json_answer is not None and isinstance(json_answer.schema, Schema) and json_answer.schema.one_of:
                json_answer.schema = next(s for s in json_answer.schema.one_of if isinstance(s, Reference))
            ok.content["text/event-stream"] = OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.STRING,
                    description=f'With "stream": true: server-sent events, each data line one {chunk.__name__} '
                    "(an error body if the generation fails mid-way), then the line [DONE].",
                    content_media_type="application/json",
                    content_schema=Reference(f"#/components/schemas/{chunk.__name__}"),
                )
            )

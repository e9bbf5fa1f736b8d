"""Bad input: the API fuzzed from its own OpenAPI schema, then the classic bad requests by hand.

Promise: no request, however malformed, gets a 5xx or a stack trace; every error is OpenAI's
`{"error": {"message", "type", "param", "code"}}` with the right status.
"""

from __future__ import annotations

import collections
import json
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.hardening.conftest import Server, assert_openai_error

pytestmark = pytest.mark.slow

SERVED = ("base_model", "merged_model")
# Per operation. The 6 operations with a body or a path parameter take them all; the 7 without
# parameters run once (hypothesis stops when it has tried everything): 6 x 175 + 7 = 1,057 cases,
# about a minute here. HARDENING_FUZZ_EXAMPLES scales the run.
MAX_EXAMPLES = int(os.environ.get("HARDENING_FUZZ_EXAMPLES", "175"))
MIN_CASES = 1000
# The tiny model's context is 1024 tokens: generated max_tokens that the engine would really
# generate are capped to this, so a CI-sized run stays in a couple of minutes.
FUZZ_MAX_TOKENS = 8


@pytest.fixture(scope="module")
def api_schema(server: Server) -> schemathesis.BaseSchema:
    """The server's own OpenAPI schema, as Litestar serves it."""
    return schemathesis.openapi.from_url(f"{server.url}/schema/openapi.json")


def _steer(body: object) -> None:
    """Aim most generated bodies at served models and keep real generations short (the case stays valid or not)."""
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str) and len(model) % 3:  # a third keep their random name: the 404 path
        body["model"] = SERVED[len(model) % 2]
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and FUZZ_MAX_TOKENS < value <= 1024:
            body[key] = FUZZ_MAX_TOKENS


def _check(case: schemathesis.Case, response: httpx.Response | object) -> None:
    status = response.status_code  # type: ignore[attr-defined]
    assert status < 500, (case.method, case.path, case.body, status, response.text[:500])  # type: ignore[attr-defined]
    if status >= 400 and case.method != "HEAD":
        body = response.json()  # type: ignore[attr-defined]
        assert set(body) == {"error"}, (case.method, case.path, case.body, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, (case.body, body)
        assert "Traceback" not in body["error"]["message"], body


def test_fuzzed_requests_never_get_a_5xx_and_errors_have_openai_shape(api_schema: schemathesis.BaseSchema) -> None:
    """Every operation of the schema, valid and invalid data (schemathesis's positive and negative modes)."""
    sent: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    failures: dict[str, str] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        strategy = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
        )

        @settings(
            max_examples=MAX_EXAMPLES,
            phases=[Phase.generate],  # no shrinking: a failure is reported as generated, in bounded time
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def fuzz(case: schemathesis.Case) -> None:
            _steer(case.body)
            response = case.call(timeout=60)
            sent[case.operation.label] += 1
            statuses[response.status_code] += 1
            _check(case, response)

        try:
            fuzz()
        except AssertionError as e:  # keep fuzzing the other operations; all failures are reported below
            failures[operation.label] = str(e)[:1000]
    total = sum(sent.values())
    print(f"\nfuzz: {total} cases over {len(sent)} operations; statuses {dict(sorted(statuses.items()))}")
    assert not failures, failures
    assert total >= MIN_CASES, dict(sent)
    assert statuses[200] >= 10, dict(statuses)  # some generated requests were valid and really generated


# ---- by hand ----

PROMPT = {"model": "base_model", "prompt": "The city", "max_tokens": 4}
CHAT = {"model": "base_model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "base_model", "prompt": ',  # truncated JSON
        b"{'model': 'base_model'}",  # not JSON
        b"",
        b"null",
        b"[1, 2]",
        b'{"model": "base_model", "prompt": "caf\xc3"}',  # invalid UTF-8
        b'{"model": "base_model", "prompt": "\xff\xfe\xfd"}',
        b'{"model": "base_model", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deep nesting
    ],
    ids=["truncated", "not-json", "empty", "null", "array", "cut-utf8", "bad-utf8", "deep-nesting"],
)
def test_bodies_that_are_not_a_json_object_get_400(server: Server, content: bytes) -> None:
    r = httpx.post(
        f"{server.url}/v3/completions", content=content, headers={"content-type": "application/json"}, timeout=30
    )
    assert_openai_error(r, 400)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_tokens": 2**80}, "max_tokens"),
        ({"max_tokens": 1e308}, "max_tokens"),
        ({"n": 10**6}, "n"),
        ({"n": 0}, "n"),
        ({"n": "two"}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"seed": -5}, "seed"),
        ({"logprobs": 5}, "logprobs"),
        ({"model": 7}, "model"),
        ({"best_of": 2}, "best_of"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
    ],
)
def test_wrong_types_and_values_get_400_naming_the_parameter(server: Server, change: dict, param: str) -> None:
    r = httpx.post(f"{server.url}/v3/completions", json={**PROMPT, **change}, timeout=30)
    error = assert_openai_error(r, 400)
    assert _names(error["param"], param), error


def _names(given: str | None, param: str) -> bool:
    """`param` is named, or an element or field of it (`prompt[0]`, `messages[0].role`)."""
    return given is not None and (given == param or given.startswith((f"{param}[", f"{param}.")))


def test_missing_model_and_prompt_are_named(server: Server) -> None:
    for missing in ("model", "prompt"):
        body = {k: v for k, v in PROMPT.items() if k != missing}
        error = assert_openai_error(httpx.post(f"{server.url}/v3/completions", json=body), 400)
        assert error["param"] == missing, error


def test_an_empty_prompt_is_served(server: Server) -> None:
    # OpenAI accepts an empty prompt: generation starts from the BOS token alone.
    r = httpx.post(f"{server.url}/v3/completions", json={**PROMPT, "prompt": ""}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_prompt_longer_than_the_context_gets_400_naming_the_prompt(server: Server) -> None:
    huge = "lorem ipsum dolor " * 20_000  # ~360 kB, far beyond 1024 tokens, under the body limit
    error = assert_openai_error(httpx.post(f"{server.url}/v3/completions", json={**PROMPT, "prompt": huge}), 400)
    assert error["param"] == "prompt" and "context" in error["message"], error
    error = assert_openai_error(
        httpx.post(f"{server.url}/v3/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": huge}]}),
        400,
    )
    assert error["param"] == "messages", error
    # the server is unharmed
    assert httpx.post(f"{server.url}/v3/completions", json=PROMPT, timeout=30).status_code == 200


def test_a_long_list_of_prompts_times_n_is_refused_or_served_never_a_5xx(server: Server) -> None:
    body = {**PROMPT, "prompt": ["a"] * 64, "n": 16, "max_tokens": 1}  # 1,024 sequences in one request
    r = httpx.post(f"{server.url}/v3/completions", json=body, timeout=120)
    if r.status_code != 200:
        assert_openai_error(r, r.status_code)
        assert r.status_code in (400, 503), r.text
    else:
        assert len(r.json()["choices"]) == 64 * 16


@pytest.mark.parametrize("prompt", ["\u0000\u0000", "\ud800", "\U0010ffff" * 50, "\u202e" + "🙂" * 200])
def test_odd_unicode_in_the_prompt_never_gets_a_5xx(server: Server, prompt: str) -> None:
    content = json.dumps({**PROMPT, "prompt": prompt}).encode()  # json.dumps escapes a lone surrogate as \ud800
    r = httpx.post(f"{server.url}/v3/completions", content=content, headers={"content-type": "application/json"})
    if r.status_code != 200:
        assert_openai_error(r, 400)


def test_an_unknown_model_gets_404_listing_the_served_ones(server: Server) -> None:
    for path, body in (("/v3/completions", PROMPT), ("/v1/chat/completions", CHAT)):
        error = assert_openai_error(
            httpx.post(f"{server.url}{path}", json={**body, "model": "no_such_model"}), 404, "model_not_found"
        )
        assert error["param"] == "model" and all(name in error["message"] for name in SERVED), error
    assert_openai_error(httpx.get(f"{server.url}/v3/models/no_such_model"), 404, "model_not_found")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"max_tokens": 4, "max_completion_tokens": 4}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"n": 10**6}, "n"),
        ({"tools": []}, "tools"),
    ],
)
def test_bad_chat_requests_get_400_naming_the_parameter(server: Server, change: dict, param: str) -> None:
    error = assert_openai_error(httpx.post(f"{server.url}/v3/chat/completions", json={**CHAT, **change}), 400)
    assert _names(error["param"], param), error


def test_a_body_over_the_limit_gets_413_and_the_server_keeps_serving(server: Server) -> None:
    big = {**PROMPT, "prompt": "x" * (5 << 20)}  # the default limit is 4 MiB
    assert_openai_error(httpx.post(f"{server.url}/v3/completions", json=big, timeout=60), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit must hold while reading a chunked body too
        yield b'{"model": "base_model", "prompt": "'
        for _ in range(80):
            yield b"x" * (64 << 10)
        yield b'"}'

    r = httpx.post(f"{server.url}/v3/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, "payload_too_large")
    assert httpx.post(f"{server.url}/v3/completions", json=PROMPT, timeout=30).status_code == 200


def test_routes_and_methods_that_do_not_exist_get_the_error_shape(server: Server) -> None:
    assert_openai_error(httpx.get(f"{server.url}/v3/nothing"), 404)
    assert_openai_error(httpx.get(f"{server.url}/v3/completions"), 405)
    assert_openai_error(httpx.delete(f"{server.url}/v3/models"), 405)


def test_the_schema_documents_errors_in_openai_shape_and_the_real_bounds(server: Server) -> None:
    """Clients generate SDKs and fuzzers from the schema: it must say what the server does."""
    spec = httpx.get(f"{server.url}/schema/openapi.json").json()
    responses = spec["paths"]["/v3/completions"]["post"]["responses"]
    documented = responses["400"]["content"]["application/json"]["schema"]
    documented = _resolve(spec, documented)
    assert "error" in documented.get("properties", {}), f"400 is documented as {documented}"
    request = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    # temperature >= 0, top_p > 0 and max_tokens >= 1 are enforced (a 400 otherwise): the schema must say so.
    assert _bound(request["temperature"], "minimum") == 0, request["temperature"]
    assert _bound(request["top_p"], "exclusiveMinimum") == 0, request["top_p"]
    assert _bound(request["max_tokens"], "minimum") == 1, request["max_tokens"]  # max_tokens=0 is refused


def _resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _bound(prop: dict, key: str) -> float | None:
    if key in prop:
        return prop[key]
    for option in prop.get("oneOf", []) + prop.get("anyOf", []):
        if key in option:
            return option[key]
    return None

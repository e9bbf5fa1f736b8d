"""The OpenAI-compatible API end to end: a real server process, real OpenVINO inference, over HTTP."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from demo.data import REFERENCE_PROMPT
from tests.serving.conftest import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v3", api_key="unused", max_retries=0)


def test_reference_demo_request_verbatim_differs_between_merged_and_base(server: Server) -> None:
    bodies = {}
    with server.client() as http:
        for model in ("merged_model", "base_model"):
            r = http.post("/v3/completions", json={"model": model, "prompt": REFERENCE_PROMPT})
            assert r.status_code == 200, r.text
            bodies[model] = body = r.json()
            assert body["object"] == "text_completion"
            assert body["model"] == model
            assert body["id"].startswith("cmpl-")
            assert isinstance(body["created"], int)
            (choice,) = body["choices"]
            assert set(choice) == {"finish_reason", "index", "logprobs", "text"}
            assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
            usage = body["usage"]
            assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    merged, base = (bodies[m]["choices"][0]["text"] for m in ("merged_model", "base_model"))
    assert "SELECT" in merged
    assert "SELECT" not in base
    assert merged != base


def test_openai_client_completion_is_greedy_and_repeatable(client: openai.OpenAI) -> None:
    a = client.completions.create(model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=20, temperature=0)
    b = client.completions.create(model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=20, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text.lstrip().startswith("SELECT")
    assert a.usage.completion_tokens <= 20
    assert a.system_fingerprint == "merged_model/1"


def test_max_tokens_bounds_the_completion_and_reports_length(client: openai.OpenAI) -> None:
    r = client.completions.create(model="base_model", prompt="The city", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_list_of_prompts_and_n_give_one_choice_each(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="base_model", prompt=["The city", "A traveler"], n=2, max_tokens=5, temperature=0.8, seed=7
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text for c in r.choices)
    again = client.completions.create(
        model="base_model", prompt=["The city", "A traveler"], n=2, max_tokens=5, temperature=0.8, seed=7
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded sampling repeats


def test_stop_string_ends_the_completion_and_can_be_kept(client: openai.OpenAI) -> None:
    full = client.completions.create(model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=30).choices[0].text
    assert " FROM" in full
    cut = client.completions.create(model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=30, stop=[" FROM"])
    assert cut.choices[0].text == full[: full.index(" FROM")]
    assert cut.choices[0].finish_reason == "stop"
    kept = client.completions.create(
        model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=30, stop=" FROM",
        extra_body={"include_stop_str_in_output": True},
    )
    assert kept.choices[0].text == full[: full.index(" FROM") + len(" FROM")]


def test_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    r = client.completions.create(model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=5, echo=True)
    assert r.choices[0].text.startswith(REFERENCE_PROMPT)
    assert len(r.choices[0].text) > len(REFERENCE_PROMPT)


def test_logprobs_give_one_logprob_per_token(client: openai.OpenAI) -> None:
    r = client.completions.create(model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=6, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text


def test_chat_completion_uses_the_chat_template(client: openai.OpenAI) -> None:
    question = REFERENCE_PROMPT.removeprefix("[user] ").removesuffix(" [/user] [assistant]")
    r = client.chat.completions.create(
        model="merged_model", messages=[{"role": "user", "content": question}], max_tokens=30, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert "SELECT" in r.choices[0].message.content
    # The template renders exactly the demo's prompt format, so chat and completion agree.
    c = client.completions.create(model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=30, temperature=0)
    assert r.choices[0].message.content == c.choices[0].text
    assert r.usage.prompt_tokens == c.usage.prompt_tokens


def test_streaming_completion_matches_the_plain_one(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=25)
    chunks = list(
        client.completions.create(
            model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=25, stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert len([c for c in chunks if c.choices]) > 2  # really streamed, token by token
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_streaming_chat(client: openai.OpenAI) -> None:
    question = REFERENCE_PROMPT.removeprefix("[user] ").removesuffix(" [/user] [assistant]")
    messages = [{"role": "user", "content": question}]
    plain = client.chat.completions.create(model="merged_model", messages=messages, max_tokens=20)
    chunks = list(client.chat.completions.create(model="merged_model", messages=messages, max_tokens=20, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_raw_stream_is_server_sent_events_ending_with_done(server: Server) -> None:
    body = {"model": "base_model", "prompt": "The city", "max_tokens": 4, "stream": True}
    with server.client() as http, http.stream("POST", "/v3/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "text_completion" for d in data[:-1])


def test_model_list_and_model_lookup(client: openai.OpenAI) -> None:
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["base_model", "merged_model"]
    assert client.models.retrieve("merged_model").id == "merged_model"


def test_v1_aliases_serve_the_same_api(server: Server) -> None:
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    r = c.completions.create(model="merged_model", prompt=REFERENCE_PROMPT, max_tokens=5, temperature=0)
    assert r.choices[0].text.lstrip().startswith("SELECT")
    assert {m.id for m in c.models.list()} == {"base_model", "merged_model"}


def test_health_metrics_config_and_openapi(server: Server) -> None:
    with server.client() as http:
        assert http.get("/v2/health/live").status_code == 200
        ready = http.get("/v2/health/ready").json()
        assert ready["models"] == {"base_model": 1, "merged_model": 1} and ready["failures"] == {}
        http.post("/v3/completions", json={"model": "base_model", "prompt": "x", "max_tokens": 2})
        metrics = http.get("/metrics").text
        for name in (
            'lora_serve_requests_total{endpoint="completions",model="base_model",status="200"}',
            'lora_serve_model_loaded{kind="merged",model="merged_model",version="1"} 1.0',
            "lora_serve_queue_depth{",
            "lora_serve_time_to_first_token_seconds_bucket{",
            "lora_serve_request_latency_seconds_bucket{",
            "lora_serve_prompt_tokens_total{",
            "lora_serve_completion_tokens_total{",
        ):
            assert name in metrics, name
        config = http.get("/v1/config").json()
        assert config["merged_model"]["model_version_status"][0] == {
            "version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": "OK"}
        }
        schema = http.get("/schema/openapi.json").json()
        assert "/v3/completions" in schema["paths"] and "/v1/chat/completions" in schema["paths"]
        # Both answers are documented: the JSON one, and the stream's chunks (text/event-stream)
        for path, answer, chunk in [("/v3/completions", "Completion", "CompletionChunk"),
                                    ("/v1/chat/completions", "ChatCompletion", "ChatCompletionChunk")]:
            content = schema["paths"][path]["post"]["responses"]["200"]["content"]
            assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{answer}"}
            events = content["text/event-stream"]["schema"]
            assert events["contentSchema"] == {"$ref": f"#/components/schemas/{chunk}"}
            assert "choices" in schema["components"]["schemas"][chunk]["properties"]


# ---- errors: OpenAI's shape, the right status, never a 500 ----


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "base_model", "prompt": "x", "best_of": 2}, "best_of", "unsupported parameter"),
        ({"model": "base_model", "prompt": "x", "logit_bias": {}}, "logit_bias", "unsupported parameter"),
        ({"model": "base_model", "prompt": "x", "temperature": 3}, "temperature", "<= 2.0"),
        ({"model": "base_model", "prompt": "x", "top_p": 0}, "top_p", "> 0.0"),
        ({"model": "base_model", "prompt": "x", "n": 0}, "n", ">= 1"),
        ({"model": "base_model", "prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
        ({"model": "base_model", "prompt": ["x", 1]}, "prompt[1]", "str"),
        ({"model": "base_model"}, "prompt", "missing"),
        ({"model": "base_model", "prompt": []}, "prompt", "non-empty"),
        ({"model": "base_model", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"model": "base_model", "prompt": "x", "max_tokens": 100000}, "max_tokens", "context"),
        ({"model": "base_model", "prompt": "x", "logprobs": 3}, "logprobs", "only 0 or 1"),
        ({"model": "base_model", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ],
)
def test_bad_completion_parameters_are_named_with_400(server: Server, body: dict, param: str, words: str) -> None:
    with server.client() as http:
        err = _error(http.post("/v3/completions", json=body), 400)
    assert err["param"] == param
    assert words in err["message"]
    assert err["type"] == "invalid_request_error"


def _both_endpoints(http: httpx.Client, body: dict) -> dict[str, dict]:
    """The same request as a completion of "The city" and as a chat answer to "hi": each 200, its body."""
    bodies = {}
    for path, extra in (("/v3/completions", {"prompt": "The city"}),
                        ("/v3/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        chat_body = {"model": "base_model", **extra, **body}
        if path.endswith("chat/completions"):
            chat_body.pop("logprobs", None)
        r = http.post(path, json=chat_body)
        assert r.status_code == 200, (path, r.text)
        bodies[path] = r.json()
    return bodies


def _texts(body: dict) -> list[str]:
    return [c["text"] if "text" in c else c["message"]["content"] for c in body["choices"]]


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "seed": 3},
        {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
        {"ignore_eos": True, "include_stop_str_in_output": True, "stop": ["a", "b"]},
        {"top_k": -1, "user": "someone", "logprobs": 0, "n": 2},
    ],
)
def test_every_documented_parameter_is_accepted_and_max_tokens_still_bounds(server: Server, extra: dict) -> None:
    with server.client() as http:
        for path, body in _both_endpoints(http, {"max_tokens": 5, **extra}).items():
            n = extra.get("n", 1)
            assert len(body["choices"]) == n, (path, body)
            assert 0 < body["usage"]["completion_tokens"] <= 5 * n, (path, body["usage"])
            if extra.get("ignore_eos") and not extra.get("stop"):
                assert body["usage"]["completion_tokens"] == 5 * n, (path, body["usage"])


def test_max_tokens_bounds_both_endpoints_exactly_without_eos(server: Server) -> None:
    with server.client() as http:
        for path, body in _both_endpoints(http, {"max_tokens": 3, "ignore_eos": True}).items():
            assert body["usage"]["completion_tokens"] == 3, (path, body["usage"])
            assert body["choices"][0]["finish_reason"] == "length", path


def test_a_seed_repeats_a_sampled_answer_and_other_seeds_change_it(server: Server) -> None:
    sampled = {"temperature": 1.0, "top_p": 0.95, "top_k": 20, "max_tokens": 16, "ignore_eos": True}
    with server.client() as http:
        first = _both_endpoints(http, {**sampled, "seed": 3})
        again = _both_endpoints(http, {**sampled, "seed": 3})
        others = [_both_endpoints(http, {**sampled, "seed": seed}) for seed in range(4, 9)]
    for path in first:
        assert _texts(again[path]) == _texts(first[path]), path  # the same seed: the same tokens
        # and the seed is what decides them: five other seeds do not all land on the same answer
        assert any(_texts(o[path]) != _texts(first[path]) for o in others), (path, _texts(first[path]))


def _streamed_texts(http: httpx.Client, path: str, body: dict) -> str:
    extra = {"prompt": "The city"} if path == "/v3/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    with http.stream("POST", path, json={"model": "base_model", **extra, **body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        frames = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
    return "".join(c.get("text") or c.get("delta", {}).get("content") or "" for f in frames for c in f["choices"])


def test_a_stop_string_ends_the_answer_on_both_endpoints_where_it_starts_even_inside_a_token(server: Server) -> None:
    greedy = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
    with server.client() as http:
        full = {path: _texts(b)[0] for path, b in _both_endpoints(http, greedy).items()}
        for path, text in full.items():
            # A word of the answer's second half, with the space before it (the start of a token), and the
            # same word without its space: the space then ends the answer though it shares a token with the
            # word (OpenAI cuts the text, not the tokens).
            word = re.compile(r" \w{2,}").search(text, len(text) // 2)
            assert word, (path, text)
            for stop in (word.group(), word.group()[1:]):
                cut, kept = text[: text.index(stop)], text[: text.index(stop) + len(stop)]
                body = _both_endpoints(http, {**greedy, "stop": [stop]})[path]
                assert _texts(body)[0] == cut, (path, text, stop)
                assert body["choices"][0]["finish_reason"] == "stop", path
                assert _streamed_texts(http, path, {**greedy, "stop": [stop]}) == cut, (path, text, stop)
                with_stop = {**greedy, "stop": [stop], "include_stop_str_in_output": True}
                assert _texts(_both_endpoints(http, with_stop)[path])[0] == kept, (path, text, stop)
                assert _streamed_texts(http, path, with_stop) == kept, (path, text, stop)


def test_bad_chat_parameters_are_named_with_400(server: Server) -> None:
    with server.client() as http:
        err = _error(http.post("/v3/chat/completions", json={"model": "base_model", "messages": [
            {"role": "user", "content": "x", "tool_calls": []}]}), 400)
        assert err["param"] == "messages[0].tool_calls"
        err = _error(http.post("/v3/chat/completions", json={"model": "base_model", "messages": [],
                                                              "tools": []}), 400)
        assert err["param"] == "tools"
        err = _error(http.post("/v3/chat/completions", json={"model": "base_model", "messages": []}), 400)
        assert err["param"] == "messages"


def test_unknown_model_is_404_listing_the_served_ones(server: Server) -> None:
    with server.client() as http:
        err = _error(http.post("/v3/completions", json={"model": "gpt-4", "prompt": "x"}), 404)
        assert err["param"] == "model" and "base_model" in err["message"] and "merged_model" in err["message"]
        err = _error(http.get("/v3/models/gpt-4"), 404)
        assert "merged_model" in err["message"]


def test_malformed_bodies_routes_and_methods_get_the_error_shape(server: Server) -> None:
    with server.client() as http:
        _error(http.post("/v3/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
        _error(http.post("/v3/completions", json=[1, 2]), 400)
        _error(http.post("/v3/completions", content=b"\xff\xfe", headers={"content-type": "application/json"}), 400)
        _error(http.get("/v3/nowhere"), 404)
        _error(http.delete("/v3/completions"), 405)
        _error(http.post("/v3/completions", json={"model": "base_model", "prompt": "x" * (5 << 20)}), 413)

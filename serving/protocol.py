"""OpenAI's HTTP protocol as msgspec structs; each request converts itself to an openvino-genai GenerationConfig.

Requests list their fields in the order of OpenAI's reference, then the fields beyond it in one
marked block (vLLM's extras). Unknown fields are refused by name (`forbid_unknown_fields`), so a
parameter we do not implement (`best_of`, `logit_bias`, `suffix`, `tools`, ...) is a 400 naming
it, never silently ignored.

Precedence of every generation parameter: the request's value, then the model's
generation_config.json (read with Hugging Face semantics: no `do_sample` means greedy, as OpenVINO
Model Server does), then OpenAI's default.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import msgspec
import openvino_genai as ov_genai

from serving.errors import InvalidParameter

# OpenAI's default max_tokens for /completions; chat has none (the rest of the context).
OPENAI_COMPLETION_MAX_TOKENS = 16
MAX_STOP_STRINGS = 4

Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The sampling parameters completions and chat share, and their conversion."""

    model: str
    frequency_penalty: Penalty | None = None
    max_tokens: PositiveInt | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    presence_penalty: Penalty | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    user: str | None = None  # an end-user id for abuse tracking: accepted, not used
    # --- beyond OpenAI's spec (vLLM's names) ---
    top_k: Annotated[int, msgspec.Meta(ge=-1)] | None = None  # -1 or 0: no top-k filtering
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    def check(self) -> None:
        """Cross-field rules msgspec's types cannot say."""
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameter(f"stop takes up to {MAX_STOP_STRINGS} strings, got {len(self.stop)}", param="stop")
        if self.stop_strings and any(s == "" for s in self.stop_strings):
            raise InvalidParameter("stop strings must not be empty", param="stop")
        if self.stream_options is not None and not self.stream:
            raise InvalidParameter("stream_options is only allowed when stream is true", param="stream_options")

    @property
    def stop_strings(self) -> set[str]:
        if self.stop is None:
            return set()
        return {self.stop} if isinstance(self.stop, str) else set(self.stop)

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def default_max_tokens(self) -> int | None:
        """OpenAI's default when neither the request nor the model sets one; None: the rest of the context."""
        return None

    def to_generation_config(
        self,
        model_defaults: ov_genai.GenerationConfig,
        *,
        prompt_tokens: int,
        context_length: int,
        choice_index: int = 0,
        logprobs: int = 0,
    ) -> ov_genai.GenerationConfig:
        """One sequence's GenerationConfig (`n` choices are `n` requests): `model_defaults` (a new one, the model's
        generation_config.json) with the request's settings."""
        config = model_defaults
        room = context_length - prompt_tokens
        if room < 1:
            raise InvalidParameter(
                f"the prompt has {prompt_tokens} tokens, which leaves no room in the model's context of "
                f"{context_length} tokens",
                param="messages" if hasattr(self, "messages") else "prompt",
            )
        requested = self.requested_max_tokens()
        if requested is not None:
            if requested > room:
                raise InvalidParameter(
                    f"max_tokens is {requested}, but the model's context is {context_length} tokens and the prompt "
                    f"takes {prompt_tokens}: at most {room} tokens can be generated",
                    param="max_tokens",
                )
            max_new = requested
        elif _model_sets(config.max_new_tokens):
            max_new = min(config.max_new_tokens, room)
        else:
            max_new = min(self.default_max_tokens() or room, room)
        # Always set: genai's default is unlimited.
        config.max_new_tokens = max_new

        if self.temperature is not None:
            if self.temperature == 0.0:
                config.do_sample = False
            else:
                config.do_sample = True
                config.temperature = self.temperature
        if self.top_p is not None:
            config.top_p = self.top_p
        if self.top_k is not None and self.top_k > 0:
            config.top_k = self.top_k
        if self.min_p is not None:
            config.min_p = self.min_p
        if self.presence_penalty is not None:
            config.presence_penalty = self.presence_penalty
        if self.frequency_penalty is not None:
            config.frequency_penalty = self.frequency_penalty
        if self.repetition_penalty is not None:
            config.repetition_penalty = self.repetition_penalty
        if self.seed is not None:
            # n choices from one seed must still differ from each other, and repeat across calls.
            config.rng_seed = (self.seed + choice_index) % 2**63
        if self.stop_strings:
            config.stop_strings = self.stop_strings
            # genai would drop whole tokens; the text is cut at the stop string by the service (serving/stops.py).
            config.include_stop_str_in_output = True
        config.ignore_eos = self.ignore_eos
        config.num_return_sequences = 1
        config.logprobs = logprobs
        config.apply_chat_template = False  # prompts arrive templated (chat) or raw (completions)
        try:
            config.validate()
        except Exception as e:  # genai's own range checks: keep its sentence, not its source location
            lines = [x for x in str(e).splitlines() if x.strip() and not x.startswith("Check ")]
            raise InvalidParameter(f"invalid generation parameters: {lines[-1] if lines else e}") from None
        return config


def _model_sets(max_new_tokens: int) -> bool:
    # genai reports "unset" as SIZE_MAX
    return 0 < max_new_tokens < 2**63


class CompletionRequest(SamplingFields, forbid_unknown_fields=True, kw_only=True):
    """POST /v3/completions."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidParameter("prompt must be a string or a non-empty list of strings", param="prompt")
        if self.logprobs is not None and self.logprobs > 1:
            raise InvalidParameter(
                f"logprobs is {self.logprobs}, but only 0 or 1 is supported: openvino-genai returns the "
                "log-probability of the sampled token only",
                param="logprobs",
            )
        if self.echo and self.logprobs is not None:
            raise InvalidParameter("echo together with logprobs is not supported (no prompt logprobs)", param="echo")

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def default_max_tokens(self) -> int | None:
        return OPENAI_COMPLETION_MAX_TOKENS


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields, forbid_unknown_fields=True, kw_only=True):
    """POST /v3/chat/completions."""

    messages: list[ChatMessage]
    logprobs: bool = False
    max_completion_tokens: PositiveInt | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None

    def check(self) -> None:
        super().check()
        if not self.messages:
            raise InvalidParameter("messages must hold at least one message", param="messages")
        if self.top_logprobs:
            raise InvalidParameter(
                "top_logprobs above 0 is not supported: openvino-genai returns the log-probability of the sampled "
                "token only",
                param="top_logprobs",
            )
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidParameter("set max_completion_tokens or max_tokens, not both", param="max_tokens")

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def history(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for "system"; templates know only the latter.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# ---- responses ----

FinishReason = Literal["stop", "length"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None  # the version that answered, e.g. "merged_model/3"


class CompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: Literal["text_completion"] = "text_completion"
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, float]]


class ChatChoiceLogprobs(msgspec.Struct):
    content: list[ChatLogprob]


class AssistantMessage(msgspec.Struct):
    content: str
    role: Literal["assistant"] = "assistant"


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | None = None
    system_fingerprint: str | None = None


class NumericsInfo(msgspec.Struct):
    inference_precision: str
    kv_cache_precision: str
    dynamic_quantization_group_size: int


class ModelNumerics(msgspec.Struct):
    """How a model is computed: what its version pins, and what this server's CPU computes with that."""

    pinned: NumericsInfo | None  # None: a version built before versions pinned their numerics
    effective: NumericsInfo


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    root: str
    parent: str | None
    object: Literal["model"] = "model"
    # Beyond OpenAI's card (as vLLM adds max_model_len): the numerics, from the version's manifest;
    # what the name is (merged, base or runtime adapter on `parent`), its live version and weight format.
    numerics: ModelNumerics | None = None
    kind: Literal["merged", "base", "adapter"] | None = None
    version: int | None = None
    weight_format: str | None = None  # None: the manifest records none (a version published by hand)


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ModelManifest(msgspec.Struct):
    """The live version of a served name and its manifest: sources and revisions, build, numerics, validation.

    Beyond OpenAI's API (GET /v3/models/{id}/manifest). The manifest's table of file hashes is left out.
    """

    id: str
    version: int
    kind: Literal["merged", "base", "adapter"]
    manifest: dict[str, Any]
    object: Literal["model.manifest"] = "model.manifest"


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorInfo

"""Request and response bodies of the OpenAI-compatible API (pydantic models; they make the OpenAPI schema).

Validation of a request body, before anything reaches the engine:
- Types are strict: an int field takes a JSON integer (not ``true``, ``2.0`` or ``"2"``), a
  number field a JSON number, a boolean ``true``/``false``. Every number must be finite:
  ``NaN``, ``Infinity`` and ``1e999`` (which Python's ``json`` reads as floats) are a 400
  that names the field.
- Ranges of the sampling fields are ``SamplingParams``'s (one place); ``seed`` is an int64 as
  in vLLM; counts such as ``logprobs`` are bounded by the engine (``max_logprobs``) when the
  request is added. A failed check is a 400 naming the field.
- Fields of OpenAI's or vLLM's API that name a feature this engine does not implement
  (``UNSUPPORTED`` below: beam search, ``logit_bias``, ``suffix``, legacy ``functions`` ...) are a 400 naming the field unless they hold their no-op value; they are
  never silently ignored.
- Structured outputs (``response_format``, ``structured_outputs``, ``guided_*``) and ``tools`` /
  ``tool_choice`` are honoured (``structured.py``); a constraint that does not compile is a 400.
- Other unknown fields (``user``, ``metadata``, ``service_tier`` ...) change nothing the engine
  does and are ignored. vLLM's extra sampling fields (``top_k``, ``min_p``,
  ``repetition_penalty``, ``ignore_eos`` ...) are honoured.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
NonNegInt = Annotated[int, Field(ge=0)]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _unset(v: Any) -> bool:
    return v is None


def _off(v: Any) -> bool:
    return v is None or v is False


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, (str, list, dict)) and not v)


def _one(v: Any) -> bool:
    return v is None or (type(v) in (int, float) and v == 1)


def _no_tool_choice(v: Any) -> bool:
    return v is None or v == "none"


# Request fields that name a feature the engine does not implement: field -> (the test of its
# no-op value, why). A request whose field fails the test is a 400 naming the field.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logit_bias": (_empty, "logit_bias is not supported"),
    "best_of": (_one, "only best_of=1 is supported"),
    "use_beam_search": (_off, "beam search is not supported"),
    "length_penalty": (_one, "length_penalty applies to beam search, which is not supported"),
    "early_stopping": (_off, "early_stopping applies to beam search, which is not supported"),
    "allowed_token_ids": (_unset, "allowed_token_ids is not supported"),
    "bad_words": (_empty, "bad_words is not supported"),
    "logits_processors": (_empty, "logits processors are not supported"),
    "truncate_prompt_tokens": (_unset, "prompt truncation is not supported; shorten the prompt"),
    "prompt_logprobs": (_unset, "prompt_logprobs is not supported by the server; for the prompt's log-probabilities "
                                "send echo=true with logprobs=N to /v1/completions"),
    "return_tokens_as_token_ids": (_off, "return_tokens_as_token_ids is not supported"),
    # completions only
    "suffix": (_empty, "suffix (insertion) is not supported"),
    # chat only
    "functions": (_empty, "function calling is not supported"),
    "function_call": (_no_tool_choice, 'function calling is not supported; only "none" is accepted'),
    "echo": (_off, "echo is not supported on chat completions"),
}

_UNSUPPORTED_DOC = "Not supported: any value but the no-op one is a 400 naming this field."


def _unsupported_field(default: Any = None) -> Any:
    return Field(default, description=_UNSUPPORTED_DOC)


def unsupported_field(req: BaseModel) -> tuple[str, str] | None:
    """``(field, message)`` for the first field of ``req`` that asks for an unimplemented feature."""
    values = {name: getattr(req, name) for name in type(req).model_fields}
    for name, value in values.items():
        check = UNSUPPORTED.get(name)
        if check is None or (name == "echo" and isinstance(req, CompletionRequest)):
            continue
        ok, why = check
        if not ok(value):
            return name, f"{name}={value!r:.100}: {why}"
    opts = values.get("stream_options")
    if opts is not None and opts.continuous_usage_stats:
        return "stream_options", "stream_options.continuous_usage_stats=True: usage is sent once, at the end of a stream"
    return None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingFields(OpenAIModel):
    """Sampling fields shared by completions and chat completions (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = _unsupported_field()
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    # structured outputs (structured.py): at most one source of a constraint per request
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    # named features this engine does not implement (UNSUPPORTED): a 400 unless left at the no-op value
    best_of: int | None = _unsupported_field()
    use_beam_search: bool | None = _unsupported_field()
    length_penalty: float | None = _unsupported_field()
    early_stopping: bool | str | None = _unsupported_field()
    allowed_token_ids: Any = _unsupported_field()
    bad_words: Any = _unsupported_field()
    logits_processors: Any = _unsupported_field()
    truncate_prompt_tokens: Any = _unsupported_field()
    prompt_logprobs: Any = _unsupported_field()
    return_tokens_as_token_ids: bool | None = _unsupported_field()


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = Field(False, description="Return the prompt before the completion; with logprobs, the "
                                                 "prompt tokens are scored too (the first entry is null). "
                                                 "max_tokens=0 with echo scores the prompt only.")
    logprobs: NonNegInt | None = None
    suffix: str | None = _unsupported_field()


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant message's calls (passed to the chat template)
    tool_call_id: str | None = None  # a "tool" message: the call it answers


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: NonNegInt | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    functions: Any = _unsupported_field()
    function_call: Any = _unsupported_field()
    echo: bool | None = _unsupported_field()


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    """OpenAI's model object, vLLM's ``root``/``max_model_len``, and Furiosa-LLM's extensions:
    ``artifact_id`` (here: the model loaded), ``max_prompt_len``, ``max_context_len`` and
    ``runtime_config`` (the engine's runtime settings; no compiled buckets here)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "furiosa-ai"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    artifact_id: str | None = None
    max_prompt_len: int | None = None
    max_context_len: int | None = None
    runtime_config: dict[str, Any] = Field(default_factory=dict)
    task: str | None = None  # what the model serves: "generate", or "embed" for an embedding model (vLLM's task names)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """``GET /tokenizer_info``: the tokenizer's class and configuration (as vLLM's endpoint gives it)."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    model_max_length: int | None = None
    vocab_size: int | None = None
    chat_template: str | None = None


class VersionResponse(BaseModel):
    version: str


class EmbeddingRequest(OpenAIModel):
    """``POST /v1/embeddings`` (OpenAI's shape): ``input`` is a string, a list of strings, token ids or lists of them."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's extra field


class EmbeddingData(BaseModel):
    index: int
    object: str = "embedding"
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


class ScoreRequest(OpenAIModel):
    """``POST /score`` (vLLM's shape): ``text_1`` one text or a list, ``text_2`` one text or a list (1:N or N:N)."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = None


class ScoreData(BaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class RerankRequest(OpenAIModel):
    """``POST /rerank`` (vLLM's Jina/Cohere-style shape): ``documents`` ranked by relevance to ``query``."""

    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = None  # 0 or None: all documents
    truncate_prompt_tokens: int | None = None


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]

"""The FastAPI application: OpenAI-compatible endpoints over an ``AsyncLLMEngine``.

The endpoints are module-level routes of ``router``; each gets the ``ServerState`` (engine,
tokenizer, metrics) from ``request.app.state`` through a dependency. ``create_app`` builds the
app: state, error handlers, the API-key middleware, the router.

Errors use OpenAI's JSON shape (``{"error": {"message", "type", "param", "code"}}``): a
client's mistake is a 4xx naming the field (see ``protocol`` for what is validated), never a
500; a request that fails in the engine is a 500 naming the cause, or an error event on a
stream. A client that goes away, mid-stream or while a non-streaming request runs, aborts its
request, which frees its KV blocks.

``/v1/completions`` with ``echo`` and ``logprobs`` scores the prompt tokens too (the first
entry is null); ``max_tokens=0`` with ``echo`` scores the prompt only. A stream gives the same
tokens, logprobs and text offsets as the whole response.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from furiosa_llm import __version__
from furiosa_llm.api.async_llm_engine import AsyncEngineDeadError, AsyncLLMEngine, RequestFailedError
from furiosa_llm.api.outputs import PoolingParams, RequestOutput
from furiosa_llm.api.sampling_params import RequestOutputKind, SamplingParams

from .metrics import ServerMetrics
from .structured import required_calls, structured_outputs_of, tool_mode
from .tool_parsers import ToolCall, get_tool_parser
from .protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProbs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    SamplingFields,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    TopLogprob,
    UsageInfo,
    VersionResponse,
    unsupported_field,
)

logger = logging.getLogger("furiosa_llm.server")

ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          503: {"model": ErrorResponse}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code if code is not None else status}}


def error_json(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param, code), status_code=status)


CONTENT_FORMATS = ("auto", "string", "openai")


def _attr(obj, *paths: str, default=None):
    """The first of the dotted attribute ``paths`` of ``obj`` that exists and is not None."""
    for path in paths:
        cur = obj
        for name in path.split("."):
            cur = getattr(cur, name, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return default


def leader_device(engine) -> str:
    """The device of the engine's (first) replica, for the ``leader_device`` metric label."""
    dev = _attr(engine, "native_engine.backend.device", "native_engine.device")
    if dev is not None:
        return str(dev)
    devices = _attr(engine, "native_engine.args.devices")
    return str(devices).split(",")[0].strip() if devices else "cpu"


def _default_sampling(engine) -> dict:
    """The model's sampling defaults (its generation_config), as the values the server uses for the
    sampling fields a request leaves out: ``get_diff_sampling_param()`` (only what the model sets),
    else ``get_default_sampling_params()``; empty when the engine has neither."""
    names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
             "max_tokens")
    try:
        diff = getattr(engine, "get_diff_sampling_param", None)
        if diff is not None:
            return {n: v for n, v in dict(diff()).items() if n in names and v is not None}
        get = getattr(engine, "get_default_sampling_params", None)
        if get is None:
            return {}
        sp = get()
        return {n: getattr(sp, n) for n in names[:-1] if getattr(sp, n, None) is not None}
    except Exception as e:  # noqa: BLE001 - a model without usable defaults serves with the API's
        logger.warning("no model sampling defaults: %s", e)
        return {}


class ServerState:
    """What every route needs: the engine, names, settings, the metrics."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, chat_template: str | None, *,
                 api_key: str | None = None, log_interval_s: float = 10.0, response_role: str = "assistant",
                 chat_template_content_format: str = "auto", enable_payload_logging: bool = False,
                 tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False) -> None:
        if enable_auto_tool_choice and tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice=True: needs --tool-call-parser (hermes or llama3_json)")
        self.tool_parser = get_tool_parser(tool_call_parser) if tool_call_parser is not None else None
        self.enable_auto_tool_choice = enable_auto_tool_choice
        if chat_template_content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat_template_content_format={chat_template_content_format!r}: must be one of "
                             f"{', '.join(CONTENT_FORMATS)}")
        self.engine = engine
        self.model_name = model_name
        self.chat_template = chat_template
        self.api_key = api_key
        self.log_interval_s = log_interval_s
        self.response_role = response_role
        self.chat_template_content_format = chat_template_content_format
        self.enable_payload_logging = enable_payload_logging
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = _attr(engine, "native_engine.vocab_size", default=None) or len(self.tokenizer)
        self.sampling_defaults = _default_sampling(engine)
        self.created = int(time.time())
        sched = _attr(engine, "native_engine.engine_config.scheduler_config")
        self.runtime_config = _runtime_config(engine, sched)
        self.metrics = ServerMetrics(engine, model_name, leader_device=leader_device(engine),
                                     max_model_len=self.max_model_len, block_size=getattr(sched, "block_size", None),
                                     enable_prefix_caching=getattr(sched, "enable_prefix_caching", None))


def _runtime_config(engine, sched) -> dict:
    """The model card's ``runtime_config``: the engine's runtime settings. There are no compiled
    prefill/decode buckets here (every shape runs), so the bucket lists are empty."""
    cfg = _attr(engine, "native_engine.engine_config")
    args = _attr(engine, "native_engine.args")
    out = {"prefill_buckets": [], "decode_buckets": [], "device": leader_device(engine)}
    if sched is not None:
        out.update(block_size=sched.block_size, num_kv_blocks=sched.num_blocks,
                   max_num_batched_tokens=sched.max_num_batched_tokens,
                   max_processing_samples=sched.max_processing_samples, spare_blocks_ratio=sched.spare_blocks_ratio,
                   enable_prefix_caching=sched.enable_prefix_caching)
    if cfg is not None:
        out["npu_queue_limit"] = getattr(cfg, "npu_queue_limit", None)
        jit = getattr(cfg, "jit_config", None)
        if jit is not None:
            out["enable_jit_compilation"] = jit.enabled
    if args is not None:  # the dtype the backend resolved ``auto`` to, where it has one, and the weight format
        resolved = _attr(engine, "native_engine.runner.dtype")
        out["dtype"] = str(resolved).replace("torch.", "") if resolved is not None else getattr(args, "dtype", None)
        out["quantization"] = getattr(args, "quantization", None)
    return out


# ---- helpers ------------------------------------------------------------------------------
def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{state.model_name}`.",
                       "NotFoundError", "model", "model_not_found")


def _task(state: ServerState) -> str:
    """The served model's task: "generate", or "embed" for an embedding model."""
    return getattr(state.engine.native_engine, "task", "generate") if hasattr(state.engine, "native_engine") else "generate"


def _check_generative(state: ServerState) -> None:
    if _task(state) == "embed":
        raise APIError(400, f"The model `{state.model_name}` is an embedding model (task 'embed'): it does not "
                       "generate; use /v1/embeddings", param="model")


def _check_supported(req) -> None:
    """A field naming a feature the engine does not implement is a 400 (protocol.UNSUPPORTED)."""
    bad = unsupported_field(req)
    if bad is not None:
        raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")


def _param_of(message: str, renames: dict[str, str] | None = None) -> str | None:
    """The argument a ``ValueError`` message names (``"name=value: ..."`` or ``"name: ..."``)."""
    m = re.match(r"(\w+)[=:]", message)
    if m is None:
        return None
    name = "prompt" if m.group(1).startswith("prompt_token_ids") else m.group(1)
    return (renames or {}).get(name, name)


_API_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                 "presence_penalty": 0.0, "frequency_penalty": 0.0}


def _sampling_params(state: ServerState, req: SamplingFields, max_tokens: int | None, kind: RequestOutputKind,
                     logprobs: int | None, prompt_logprobs: int | None = None, structured=None) -> SamplingParams:
    """The request's sampling fields; one it leaves out takes the model's default (its
    generation_config, as Furiosa-LLM and vLLM do), else the API's."""
    picked = {}
    for name, api_default in _API_DEFAULTS.items():
        value = getattr(req, name)
        picked[name] = value if value is not None else state.sampling_defaults.get(name, api_default)
    kw = dict(
        n=req.n if req.n is not None else 1,
        **picked,
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        ignore_eos=bool(req.ignore_eos),
        max_tokens=max_tokens,
        min_tokens=req.min_tokens or 0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
        output_kind=kind,
        structured_outputs=structured,
    )
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(str(e))) from None


def _constraint(req, mode: str = "none", named: dict | None = None):
    """``(source field, StructuredOutputsParams | None)`` of the request (structured.py); a 400 naming the field."""
    try:
        return structured_outputs_of(req, mode, named)
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(str(e))) from None


def _log_payload(state: ServerState, raw: Request, req) -> None:
    """``--enable-payload-logging``: the request body as parsed, at INFO."""
    if state.enable_payload_logging:
        logger.info("payload %s: %s", raw.url.path, req.model_dump_json(exclude_unset=True))


def _usage(prompt: int, completion: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(obj) -> str:
    data = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


async def _merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several output streams; closing the merged stream closes (aborts) them all."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, coro, on_abort=None):
    """Run ``coro``; if the client disconnects first, cancel it (which aborts its requests)."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    if on_abort is not None:
        on_abort()
    logger.info("client disconnected from %s; its request was aborted", request.url.path)
    return Response(status_code=499)


class EventStream(StreamingResponse):
    """Server-sent events that end, and abort their requests, as soon as the client goes away.

    The stream and a disconnect listener race; whichever ends first cancels the other, and the
    event generator is closed either way (so ``generate()`` aborts an unfinished request).
    """

    def __init__(self, content) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stream, watch):
                t.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
            await self.body_iterator.aclose()
        if not stream.cancelled() and stream.exception() is not None and not isinstance(stream.exception(), OSError):
            raise stream.exception()


def _decode_token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _add_completion_logprobs(lp: CompletionLogProbs, tokenizer, token_ids, logprobs, top: int, offset: int) -> int:
    """Append one entry per token to ``lp``; returns the text offset after them.

    An entry without log-probabilities (the first prompt token's) gives ``null`` for its
    logprob and its top logprobs. ``text_offset`` counts the characters of the token strings
    before each token, so a stream and a whole response give the same offsets.
    """
    logprobs = logprobs or []
    for i, tok in enumerate(token_ids):
        entry = logprobs[i] if i < len(logprobs) else None
        text = _decode_token(tokenizer, tok)
        lp.tokens.append(text)
        lp.token_logprobs.append(entry[tok].logprob if entry and tok in entry else None)
        lp.top_logprobs.append({(e.decoded_token or _decode_token(tokenizer, t)): e.logprob
                                for t, e in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[: max(top, 0)]}
                               if entry else None)
        lp.text_offset.append(offset)
        offset += len(text)
    return offset


def _chat_logprobs(tokenizer, token_ids, logprobs, top: int) -> ChatLogProbs:
    content = []
    for tok, entry in zip(token_ids, logprobs or []):
        text = _decode_token(tokenizer, tok)
        tops = [TopLogprob(token=e.decoded_token or _decode_token(tokenizer, t), logprob=e.logprob,
                           bytes=list((e.decoded_token or "").encode()))
                for t, e in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top]] if entry else []
        content.append(ChatTokenLogprob(token=text, logprob=entry[tok].logprob if entry and tok in entry else -9999.0,
                                        bytes=list(text.encode()), top_logprobs=tops))
    return ChatLogProbs(content=content)


# ---- the routes ---------------------------------------------------------------------------
router = APIRouter()


def get_state(request: Request) -> ServerState:
    """The server's state, set on the app by ``create_app``."""
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(state: State):
    try:
        await state.engine.check_health()
    except AsyncEngineDeadError as e:
        return error_json(503, f"the engine is not running: {e}", "ServiceUnavailableError")
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(state: State):
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/version", response_model=VersionResponse)
async def version():
    return VersionResponse(version=__version__)


def _model_card(state: ServerState) -> ModelCard:
    root = state.engine.model_path or state.model_name
    return ModelCard(id=state.model_name, created=state.created, root=str(root), max_model_len=state.max_model_len,
                     artifact_id=str(root), max_prompt_len=max(1, state.max_model_len - 1),
                     max_context_len=state.max_model_len, runtime_config=state.runtime_config, task=_task(state))


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(state: State):
    return ModelList(data=[_model_card(state)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
async def model(model_id: str, state: State):
    if model_id != state.model_name:
        raise APIError(404, f"The model `{model_id}` does not exist; this server serves `{state.model_name}`.",
                       "NotFoundError", "model", "model_not_found")
    return _model_card(state)


@router.get("/tokenizer_info", response_model=TokenizerInfoResponse, responses=ERRORS)
async def tokenizer_info(state: State):
    """The tokenizer's class and configuration (its JSON-serializable init arguments) and chat template."""
    tok = state.tokenizer
    info: dict = {}
    for k, v in (getattr(tok, "init_kwargs", None) or {}).items():
        if k.startswith("_") or k in ("name_or_path", "tokenizer_file", "vocab_file", "merges_file"):
            continue
        v = getattr(v, "content", v)  # AddedToken -> its text
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        info[k] = v
    template = state.chat_template or getattr(tok, "chat_template", None)
    info.update(tokenizer_class=type(tok).__name__, model_max_length=state.max_model_len,
                vocab_size=state.vocab_size, chat_template=template)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, name, None)
        if isinstance(value, str):
            info[name] = value
    return TokenizerInfoResponse(**info)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(req: TokenizeRequest, state: State):
    _check_model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        ids = _chat_prompt_ids(state, req.messages, bool(req.add_generation_prompt), False, None, None)
    else:
        ids = state.tokenizer(req.prompt, add_special_tokens=bool(req.add_special_tokens)).input_ids
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(req: DetokenizeRequest, state: State):
    _check_model(state, req.model)
    bad = [t for t in req.tokens if not 0 <= t < state.vocab_size]
    if bad:
        raise APIError(400, f"tokens: ids {bad[:5]} are outside the vocabulary [0, {state.vocab_size})", param="tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens))


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(req: CompletionRequest, raw: Request, state: State):
    _log_payload(state, raw, req)
    _check_model(state, req.model)
    _check_generative(state)
    _check_supported(req)
    prompts = _completion_prompts(req.prompt)
    stream = bool(req.stream)
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    # echo with max_tokens=0 scores the prompt only (lm-evaluation-harness loglikelihood): one token
    # is generated, because a request always samples one, and dropped from the response
    score_only = bool(req.echo) and max_tokens == 0
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    source, structured = _constraint(req)
    params = _sampling_params(state, req, 1 if score_only else max_tokens, kind, req.logprobs, prompt_logprobs,
                              structured)
    rid = f"cmpl-{uuid.uuid4().hex}"
    gens = [state.engine.generate(p, params, f"{rid}-{i}") for i, p in enumerate(prompts)]

    async def respond():
        first = await _start(gens, {"structured_outputs": source} if source else None)
        if stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(_stream_completion(state, req, rid, gens, first, include_usage, score_only))
        return await _full_completion(state, req, rid, gens, first, score_only)

    return await _unless_disconnected(raw, respond(), state.metrics.aborted)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(req: ChatCompletionRequest, raw: Request, state: State):
    _log_payload(state, raw, req)
    _check_model(state, req.model)
    _check_generative(state)
    _check_supported(req)
    try:
        mode, named = tool_mode(req, state.enable_auto_tool_choice and state.tool_parser is not None)
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(str(e))) from None
    source, structured = _constraint(req, mode, named)
    ids = _chat_prompt_ids(state, req.messages, bool(req.add_generation_prompt), bool(req.continue_final_message),
                           req.chat_template, req.chat_template_kwargs, req.tools if mode != "none" else None)
    stream = bool(req.stream)
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # the rest of the context, or less where the model's generation_config says so
        max_tokens = max(1, state.max_model_len - len(ids))
        if state.sampling_defaults.get("max_tokens"):
            max_tokens = min(max_tokens, state.sampling_defaults["max_tokens"])
    top = req.top_logprobs or 0
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    params = _sampling_params(state, req, max_tokens, kind, top if req.logprobs else None, structured=structured)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    gens = [state.engine.generate({"prompt_token_ids": ids}, params, rid)]
    tools = _ChatTools(state, mode, named)

    async def respond():
        renames = {"logprobs": "top_logprobs", **({"structured_outputs": source} if source else {})}
        first = await _start(gens, renames)
        if stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(_stream_chat(state, req, rid, gens, first, include_usage, max_tokens, tools))
        return await _full_chat(state, req, rid, gens[0], first[0], max_tokens, tools)

    return await _unless_disconnected(raw, respond(), state.metrics.aborted)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def embeddings(req: EmbeddingRequest, raw: Request, state: State):
    """Embeddings in OpenAI's shape, one pooling request per input, all through the engine at once."""
    import base64
    import struct

    _log_payload(state, raw, req)
    _check_model(state, req.model)
    _check_embedding_model(state, "embeddings")
    inp = req.input
    if isinstance(inp, str) or (isinstance(inp, list) and inp and all(isinstance(t, int) for t in inp)):
        inp = [inp]
    if not inp:
        raise APIError(400, "input: must not be empty", param="input")
    prompts = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in inp]
    try:
        params = PoolingParams(dimensions=req.dimensions, task="embed")
    except ValueError as e:
        raise APIError(400, str(e), param="dimensions") from None
    rid = f"embd-{uuid.uuid4().hex}"

    async def respond():
        results = await _encode_all(state, prompts, params, rid, req.truncate_prompt_tokens)
        data, n_tokens = [], 0
        for i, out in enumerate(results):
            vec = out.outputs.data
            n_tokens += len(out.prompt_token_ids)
            emb = (base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                   if req.encoding_format == "base64" else vec)
            data.append(EmbeddingData(index=i, embedding=emb))
        return EmbeddingResponse(id=rid, model=state.model_name, data=data,
                                 usage=UsageInfo(prompt_tokens=n_tokens, total_tokens=n_tokens))

    return await _unless_disconnected(raw, respond())


async def _encode_all(state: ServerState, prompts: list, params: PoolingParams, rid: str,
                      truncate_prompt_tokens: int | None) -> list:
    """One pooling request per prompt, all through the engine at once; their ``PoolingRequestOutput``s in order.

    A bad prompt is a 400 naming the field; an aborted request (the server shutting down) a 503.
    """
    async def one(i: int, p):
        return [o async for o in state.engine.encode(p, params, f"{rid}-{i}", truncate_prompt_tokens=truncate_prompt_tokens)]

    tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
    try:
        results = await asyncio.gather(*tasks)
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(str(e)) or "input") from None
    finally:
        for t in tasks:
            t.cancel()
    if any(not outs for outs in results):
        raise APIError(503, "the request was aborted", "ServiceUnavailableError")
    return [outs[0] for outs in results]


def _check_embedding_model(state: ServerState, what: str) -> None:
    if _task(state) != "embed":
        raise APIError(400, f"The model `{state.model_name}` is a generative model (task 'generate'); {what} "
                       "need an embedding model (e.g. all-minilm-l6-v2)", param="model")


async def _pair_scores(state: ServerState, text_1, text_2, rid: str, truncate_prompt_tokens: int | None):
    """``(scores, prompt tokens)`` of vLLM's pairs of ``text_1`` and ``text_2``: cosine similarity of their embeddings."""
    from furiosa_llm.api import score as scoring

    try:
        index = scoring.pairs(text_1, text_2)
    except ValueError as e:
        raise APIError(400, str(e), param="text_2" if str(e).startswith("text_2") else "text_1") from None
    a, b = scoring.as_list(text_1, "text_1"), scoring.as_list(text_2, "text_2")
    outs = await _encode_all(state, a + b, PoolingParams(task="embed"), rid, truncate_prompt_tokens)
    ea, eb = outs[:len(a)], outs[len(a):]
    scores = [scoring.cosine(ea[i].outputs.data, eb[j].outputs.data) for i, j in index]
    return scores, sum(len(o.prompt_token_ids) for o in outs)


@router.post("/score", response_model=ScoreResponse, responses=ERRORS)
@router.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, include_in_schema=False)
async def score(req: ScoreRequest, raw: Request, state: State):
    """vLLM's ``/score``: one score per pair of ``text_1`` and ``text_2`` (1:N or N:N); on an embedding model the
    cosine similarity of the two embeddings."""
    _log_payload(state, raw, req)
    _check_model(state, req.model)
    _check_embedding_model(state, "scores")
    rid = f"score-{uuid.uuid4().hex}"

    async def respond():
        scores, n = await _pair_scores(state, req.text_1, req.text_2, rid, req.truncate_prompt_tokens)
        return ScoreResponse(id=rid, model=state.model_name, data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
                             usage=UsageInfo(prompt_tokens=n, total_tokens=n))

    return await _unless_disconnected(raw, respond())


@router.post("/rerank", response_model=RerankResponse, responses=ERRORS)
@router.post("/v1/rerank", response_model=RerankResponse, responses=ERRORS, include_in_schema=False)
@router.post("/v2/rerank", response_model=RerankResponse, responses=ERRORS, include_in_schema=False)
async def rerank(req: RerankRequest, raw: Request, state: State):
    """vLLM's ``/rerank``: ``documents`` sorted by relevance to ``query`` (highest first), the ``top_n`` best
    (all when 0 or absent)."""
    _log_payload(state, raw, req)
    _check_model(state, req.model)
    _check_embedding_model(state, "rerank scores")
    if not req.documents:
        raise APIError(400, "documents: must not be empty", param="documents")
    if req.top_n is not None and req.top_n < 0:
        raise APIError(400, f"top_n={req.top_n}: must be >= 0 (0: all documents)", param="top_n")
    rid = f"rerank-{uuid.uuid4().hex}"

    async def respond():
        scores, n = await _pair_scores(state, req.query, req.documents, rid, req.truncate_prompt_tokens)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:req.top_n or None]
        return RerankResponse(id=rid, model=state.model_name, usage=RerankUsage(total_tokens=n),
                              results=[RerankResult(index=i, document=RerankDocument(text=req.documents[i]),
                                                    relevance_score=scores[i]) for i in order])

    return await _unless_disconnected(raw, respond())


# ---- the app ------------------------------------------------------------------------------
@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.server
    interval = state.log_interval_s
    task = asyncio.create_task(state.metrics.log_periodically(interval)) if interval > 0 else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()


async def _api_error(_request: Request, exc: APIError):
    return error_json(exc.status, exc.message, exc.type, exc.param, exc.code)


async def _validation_error(_request: Request, exc: RequestValidationError):
    parts = []
    param = None
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return error_json(400, "; ".join(parts) or "invalid request", "BadRequestError", param)


async def _http_error(_request: Request, exc: StarletteHTTPException):
    kind = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(exc.status_code, "invalid_request_error")
    return error_json(exc.status_code, str(exc.detail), kind)


async def _dead(_request: Request, exc: AsyncEngineDeadError):
    return error_json(503, f"the engine is not running: {exc}", "ServiceUnavailableError")


async def _request_failed(request: Request, exc: RequestFailedError):
    """A request whose step failed: a 500 in OpenAI's shape naming the cause; the connection stays usable."""
    logger.error("request failed: %s", exc)
    request.app.state.server.metrics.failed()
    return error_json(500, str(exc), "InternalServerError")


async def _internal_error(_request: Request, exc: Exception):
    """Anything else (a bug) is a 500 in OpenAI's shape that names the cause."""
    logger.error("request failed: %r", exc)
    return error_json(500, f"internal error: {exc}", "InternalServerError")


async def _auth(request: Request, call_next):
    api_key = request.app.state.server.api_key
    if api_key and request.url.path.startswith("/v1"):
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            return error_json(401, "Unauthorized: a valid API key is required (Authorization: Bearer <key>)",
                              "AuthenticationError", code="invalid_api_key")
    return await call_next(request)


def create_app(engine: AsyncLLMEngine, *, served_model_name: str, api_key: str | None = None,
               chat_template: str | None = None, log_interval_s: float = 10.0, response_role: str = "assistant",
               chat_template_content_format: str = "auto", allowed_origins: list[str] | None = None,
               allowed_methods: list[str] | None = None, allowed_headers: list[str] | None = None,
               allow_credentials: bool = False, enable_payload_logging: bool = False,
               tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False) -> FastAPI:
    """The server: ``router``'s endpoints over ``engine``, OpenAI's error shapes, the API key check.

    ``allowed_origins`` (``furiosa-llm serve`` gives ``["*"]`` unless told otherwise) adds CORS
    (FastAPI's ``CORSMiddleware``) with ``allowed_methods``/``allowed_headers`` (default all);
    None leaves CORS out.
    """
    app = FastAPI(title="furiosa-llm OpenAI-compatible server", version=__version__, lifespan=_lifespan)
    app.state.server = ServerState(engine, served_model_name, chat_template, api_key=api_key,
                                   log_interval_s=log_interval_s, response_role=response_role,
                                   chat_template_content_format=chat_template_content_format,
                                   enable_payload_logging=enable_payload_logging,
                                   tool_call_parser=tool_call_parser, enable_auto_tool_choice=enable_auto_tool_choice)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(AsyncEngineDeadError, _dead)
    # handlers of specific classes answer and are done; the one for Exception (Starlette's last resort)
    # answers and then re-raises to the server, which drops the client's keep-alive connection
    app.add_exception_handler(RequestFailedError, _request_failed)
    app.add_exception_handler(Exception, _internal_error)
    app.middleware("http")(_auth)
    if allowed_origins is not None:  # outermost, so preflights and error responses carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=list(allowed_methods or ["*"]), allow_headers=list(allowed_headers or ["*"]),
                           allow_credentials=allow_credentials)
    app.include_router(router)
    return app


_OPENAI_CONTENT = re.compile(r"""for\s+\w+\s+in\s+\w+\s*(\[\s*['"]content['"]\s*\]|\.content)|"""
                             r"""\[\s*['"]content['"]\s*\]\s*\[|content\s*\[\s*\d|['"]type['"]\s*\]\s*==""")


def detect_content_format(template: str | None) -> str:
    """``--chat-template-content-format auto``: "openai" when the template walks a message's content
    as a list of parts (``for part in message['content']``, ``part['type'] == ...``), else "string"."""
    return "openai" if template and _OPENAI_CONTENT.search(template) else "string"


def _completion_prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [{"prompt_token_ids": p} for p in prompt]
    raise APIError(400, "prompt: expected a string, a list of strings, a list of token ids or a list of such lists",
                   param="prompt")


def _chat_prompt_ids(state: ServerState, messages, add_generation_prompt: bool, continue_final: bool,
                     template: str | None, template_kwargs: dict | None, tools: list | None = None) -> list[int]:
    if not messages:
        raise APIError(400, "messages: must not be empty", param="messages")
    template = template or state.chat_template
    if template is None and not getattr(state.tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; start the server with --chat-template", param="messages")
    fmt = state.chat_template_content_format
    if fmt == "auto":
        fmt = detect_content_format(template if template is not None else state.tokenizer.chat_template)
    conv = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                texts.append(part["text"])
            content = [{"type": "text", "text": t} for t in texts] if fmt == "openai" else "\n".join(texts)
        elif fmt == "openai":
            content = [{"type": "text", "text": content}] if content else []
        msg = {"role": m.role, "content": content if content is not None else ""}
        if m.tool_calls is not None:
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        conv.append(msg)
    if tools:
        template_kwargs = {**(template_kwargs or {}), "tools": tools}
    try:
        ids = state.tokenizer.apply_chat_template(
            conv, tokenize=True, add_generation_prompt=add_generation_prompt and not continue_final,
            continue_final_message=continue_final, chat_template=template, **(template_kwargs or {}))
    except Exception as e:  # noqa: BLE001 - a template error is the request's (or the template's) fault
        raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None
    if hasattr(ids, "keys"):  # a BatchEncoding in recent transformers
        ids = ids["input_ids"]
    return list(ids)


async def _start(gens: list, renames: dict[str, str] | None = None) -> list[RequestOutput]:
    """Add every request and wait for its first output, so bad input is a 400 before any byte is sent.

    ``renames`` maps an engine argument a ``ValueError`` names to the request field it came from.
    """
    firsts: list[RequestOutput] = []
    try:
        for g in gens:
            firsts.append(await g.__anext__())
    except ValueError as e:
        for g in gens:
            await g.aclose()
        param, message = _param_of(str(e), renames), str(e)
        if param is not None and param != _param_of(message):
            message = f"{param}: {message}"  # the engine's name for it is not the request's
        raise APIError(400, message, param=param) from None
    except BaseException:
        for g in gens:
            await g.aclose()
        raise
    return firsts


async def _rest(gen, first: RequestOutput) -> AsyncIterator[RequestOutput]:
    yield first
    if not first.finished:
        async for out in gen:
            yield out


def _observe(state: ServerState, out: RequestOutput, num_generated: int, finish_reason: str | None = None,
             max_tokens: int | None = None) -> None:
    reason = finish_reason if finish_reason is not None else out.outputs[0].finish_reason
    state.metrics.observe(len(out.prompt_token_ids), num_generated, reason, out.metrics, n=1, max_tokens=max_tokens)


def _completion_max_tokens(req: CompletionRequest) -> int:
    return 16 if req.max_tokens is None else req.max_tokens


class _CompletionChoiceView:
    """What one completion choice shows of its request's outputs: the echoed prompt first (once),
    then the generated text, tokens and logprobs; with ``score_only`` (echo and max_tokens=0)
    the one generated token is dropped and the choice ends with "length"."""

    def __init__(self, state: ServerState, req: CompletionRequest, score_only: bool) -> None:
        self.tokenizer = state.tokenizer
        self.echo = bool(req.echo)
        self.logprobs = req.logprobs
        self.score_only = score_only
        self.echoed = not self.echo
        self.offset = 0
        self.num_generated = 0

    def chunk(self, index: int, out: RequestOutput) -> CompletionChoice:
        """The choice for ``out`` (a DELTA output in a stream, the FINAL one otherwise)."""
        c = out.outputs[0]
        text, token_ids, logprobs = c.text, c.token_ids, c.logprobs
        finish_reason, stop_reason = c.finish_reason, c.stop_reason
        if self.score_only:
            text, token_ids, logprobs = "", [], []
            if out.finished:
                finish_reason, stop_reason = "length", None
        self.num_generated += len(token_ids)
        lp = CompletionLogProbs() if self.logprobs is not None else None
        prefix = ""
        if not self.echoed:
            self.echoed = True
            prefix = out.prompt if out.prompt is not None else self.tokenizer.decode(out.prompt_token_ids)
            if lp is not None:
                self.offset = _add_completion_logprobs(lp, self.tokenizer, out.prompt_token_ids, out.prompt_logprobs,
                                                       self.logprobs, self.offset)
        if lp is not None:
            self.offset = _add_completion_logprobs(lp, self.tokenizer, token_ids, logprobs, self.logprobs, self.offset)
        return CompletionChoice(index=index, text=prefix + text, logprobs=lp, finish_reason=finish_reason,
                                stop_reason=stop_reason)


async def _full_completion(state: ServerState, req: CompletionRequest, rid: str, gens, first,
                           score_only: bool) -> CompletionResponse:
    finals: dict[int, RequestOutput] = {}
    async for i, out in _merge([_rest(g, f) for g, f in zip(gens, first)]):
        if out.finished:
            finals[i] = out
    choices, n_prompt, n_out = [], 0, 0
    for i in range(len(gens)):
        out = finals[i]
        view = _CompletionChoiceView(state, req, score_only)
        choice = view.chunk(i, out)
        choices.append(choice)
        n_prompt += len(out.prompt_token_ids)
        n_out += view.num_generated
        _observe(state, out, view.num_generated, choice.finish_reason, _completion_max_tokens(req))
    return CompletionResponse(id=rid, model=state.model_name, choices=choices, usage=_usage(n_prompt, n_out))


async def _stream_completion(state: ServerState, req: CompletionRequest, rid: str, gens, first, include_usage: bool,
                             score_only: bool):
    created = int(time.time())
    n_prompt = n_out = 0
    num_finished = 0
    views = [_CompletionChoiceView(state, req, score_only) for _ in gens]
    try:
        async for i, out in _merge([_rest(g, f) for g, f in zip(gens, first)]):
            choice = views[i].chunk(i, out)
            chunk = CompletionResponse(id=rid, created=created, model=state.model_name, choices=[choice])
            yield _sse(chunk)
            if out.finished:
                num_finished += 1
                n_prompt += len(out.prompt_token_ids)
                n_out += views[i].num_generated
                _observe(state, out, views[i].num_generated, choice.finish_reason, _completion_max_tokens(req))
        if include_usage:
            yield _sse(CompletionResponse(id=rid, created=created, model=state.model_name, choices=[],
                                          usage=_usage(n_prompt, n_out)))
        yield "data: [DONE]\n\n"
    except AsyncEngineDeadError as e:
        yield _sse(error_body(503, f"the engine is not running: {e}", "ServiceUnavailableError"))
    except Exception as e:  # noqa: BLE001 - the request failed (e.g. its step raised): tell the client, end the stream
        logger.error("stream failed: %r", e)
        if isinstance(e, RequestFailedError):
            state.metrics.failed(len(gens) - num_finished)
            num_finished = len(gens)
        yield _sse(error_body(500, f"internal error: {e}", "InternalServerError"))
        yield "data: [DONE]\n\n"  # as vLLM: the stream still ends with [DONE] after its error event
    finally:
        if num_finished < len(gens):
            state.metrics.aborted(len(gens) - num_finished)


class _ChatTools:
    """How a chat output becomes a message: plain content (mode none), or content and tool calls.

    ``named``: the output is the function's arguments; ``required``: a JSON array of
    ``{"name", "parameters"}``; ``auto``: the server's ``--tool-call-parser`` finds the calls.
    A finished output with calls ends with ``finish_reason="tool_calls"`` (a named function: "stop",
    as OpenAI does).
    """

    def __init__(self, state: ServerState, mode: str, named: dict | None) -> None:
        self.mode = mode
        self.name = named["function"]["name"] if named else None
        self.parser = state.tool_parser if mode == "auto" else None
        self.call_id = ToolCall("", "").id

    def split(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.mode == "named":
            return None, [ToolCall(self.name, text, self.call_id)]
        if self.mode == "required":
            calls = required_calls(text)
            return (None, calls) if calls else (text, [])
        if self.mode == "auto":
            return self.parser.extract(text)
        return text, []

    def finish_reason(self, reason: str | None, calls: list[ToolCall]) -> str | None:
        return "tool_calls" if calls and reason == "stop" and self.mode in ("auto", "required") else reason


async def _full_chat(state: ServerState, req: ChatCompletionRequest, rid: str, gen, first,
                     max_tokens: int | None = None, tools: _ChatTools | None = None) -> ChatCompletionResponse:
    out = first
    async for out in _rest(gen, first):
        pass
    c = out.outputs[0]
    lp = _chat_logprobs(state.tokenizer, c.token_ids, c.logprobs, req.top_logprobs or 0) if req.logprobs else None
    _observe(state, out, len(c.token_ids), max_tokens=max_tokens)
    content, calls = tools.split(c.text) if tools is not None else (c.text, [])
    finish = tools.finish_reason(c.finish_reason, calls) if tools is not None else c.finish_reason
    message = ChatResponseMessage(role=state.response_role, content=content, tool_calls=[t.to_openai() for t in calls])
    return ChatCompletionResponse(
        id=rid, model=state.model_name,
        choices=[ChatChoice(index=0, message=message, logprobs=lp, finish_reason=finish, stop_reason=c.stop_reason)],
        usage=_usage(len(out.prompt_token_ids), len(c.token_ids)))


class _ToolStream:
    """The deltas of a streamed chat with tools, in OpenAI's shape.

    A named function streams its arguments as they come (the first delta carries the call's id
    and name). ``required`` and ``auto`` hold back what may be a call (``auto``: content streams
    until the parser sees a call may start) and send each call whole when the output ends.
    """

    def __init__(self, tools: _ChatTools) -> None:
        self.tools = tools
        self.text = ""
        self.sent = 0  # characters of text already sent (as content, or as a named call's arguments)
        self.started = False

    def add(self, delta: str) -> dict:
        self.text += delta
        t = self.tools
        if t.mode == "named":
            if not delta and self.started:
                return {}
            call = {"index": 0, "function": {"arguments": delta}}
            if not self.started:
                self.started = True
                call = {"index": 0, "id": t.call_id, "type": "function", "function": {"name": t.name, "arguments": delta}}
            return {"tool_calls": [call]}
        if t.mode == "required":
            return {}
        hold = t.parser.may_start_call(self.text[self.sent:])
        end = len(self.text) if hold is None else self.sent + hold
        out = self.text[self.sent:end]
        self.sent = end
        return {"content": out} if out else {}

    def finish(self, reason: str | None) -> tuple[list[dict], str | None]:
        """The last deltas (held content, whole calls) and the finish reason."""
        t = self.tools
        if t.mode == "named":
            return [], reason
        content, calls = t.split(self.text)
        deltas = []
        if calls:
            start = t.parser.may_start_call(self.text[self.sent:]) if t.mode == "auto" else 0
            rest = self.text[self.sent:self.sent + (start or 0)]
            if rest.strip():
                deltas.append({"content": rest})
            deltas += [{"tool_calls": [call.to_openai(i)]} for i, call in enumerate(calls)]
        elif self.sent < len(self.text):
            deltas.append({"content": self.text[self.sent:]})
        return deltas, t.finish_reason(reason, calls)


async def _stream_chat(state: ServerState, req: ChatCompletionRequest, rid: str, gens, first, include_usage: bool,
                       max_tokens: int | None = None, tools: _ChatTools | None = None):
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    n_out = 0
    out = first[0]
    finished = False
    ts = _ToolStream(tools) if tools is not None and tools.mode != "none" else None
    try:
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": state.response_role, "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
        async for out in _rest(gens[0], first[0]):
            c = out.outputs[0]
            n_out += len(c.token_ids)
            lp = None
            if req.logprobs:
                lp = _chat_logprobs(state.tokenizer, c.token_ids, c.logprobs, req.top_logprobs or 0).model_dump()
            finish = c.finish_reason
            delta = {"content": c.text} if c.text else {}
            if ts is not None:
                delta = ts.add(c.text)
                if finish is not None:
                    last, finish = ts.finish(finish)
                    for d in last:
                        yield _sse({**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]})
            if delta or finish is not None or lp:
                yield _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish,
                                                 "stop_reason": c.stop_reason}]})
        finished = out.finished
        _observe(state, out, n_out, max_tokens=max_tokens)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(len(out.prompt_token_ids), n_out).model_dump()})
        yield "data: [DONE]\n\n"
    except AsyncEngineDeadError as e:
        yield _sse(error_body(503, f"the engine is not running: {e}", "ServiceUnavailableError"))
    except Exception as e:  # noqa: BLE001 - the request failed (e.g. its step raised): tell the client, end the stream
        logger.error("stream failed: %r", e)
        if isinstance(e, RequestFailedError):
            state.metrics.failed()
            finished = True
        yield _sse(error_body(500, f"internal error: {e}", "InternalServerError"))
        yield "data: [DONE]\n\n"  # as vLLM: the stream still ends with [DONE] after its error event
    finally:
        if not finished:
            state.metrics.aborted()

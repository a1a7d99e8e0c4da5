"""The FastAPI application: OpenAI-compatible endpoints over an ``AsyncLLMEngine``.

Errors use OpenAI's JSON shape (``{"error": {"message", "type", "param", "code"}}``): a
client's mistake is a 4xx, never a 500. A client that goes away, mid-stream or while a
non-streaming request runs, aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from furiosa_llm import __version__
from furiosa_llm.api.async_llm_engine import AsyncEngineDeadError, AsyncLLMEngine
from furiosa_llm.api.outputs import RequestOutput
from furiosa_llm.api.sampling_params import RequestOutputKind, SamplingParams

from .metrics import ServerMetrics
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
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprob,
    UsageInfo,
    VersionResponse,
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


class ServerState:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, chat_template: str | None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.chat_template = chat_template
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.native_engine.vocab_size
        self.metrics = ServerMetrics(engine, model_name)


# ---- helpers ------------------------------------------------------------------------------
def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{state.model_name}`.",
                       "NotFoundError", "model", "model_not_found")


def _sampling_params(req: SamplingFields, max_tokens: int | None, kind: RequestOutputKind, logprobs: int | None
                     ) -> SamplingParams:
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    kw = dict(
        n=req.n if req.n is not None else 1,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
        frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        ignore_eos=bool(req.ignore_eos),
        max_tokens=max_tokens,
        min_tokens=req.min_tokens or 0,
        logprobs=logprobs,
        skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
        output_kind=kind,
    )
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split("=", 1)[0]) from None


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


def _completion_logprobs(tokenizer, output, top: int, offset: int) -> CompletionLogProbs:
    lp = CompletionLogProbs()
    for tok, entry in zip(output.token_ids, output.logprobs or []):
        text = _decode_token(tokenizer, tok)
        lp.tokens.append(text)
        lp.token_logprobs.append(entry[tok].logprob if entry and tok in entry else None)
        lp.top_logprobs.append({(e.decoded_token or _decode_token(tokenizer, t)): e.logprob
                                for t, e in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[: max(top, 0)]}
                               if entry else None)
        lp.text_offset.append(offset)
        offset += len(text)
    return lp


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


# ---- the app ------------------------------------------------------------------------------
def create_app(engine: AsyncLLMEngine, *, served_model_name: str, api_key: str | None = None,
               chat_template: str | None = None, log_interval_s: float = 10.0) -> FastAPI:
    state = ServerState(engine, served_model_name, chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(state.metrics.log_periodically(log_interval_s)) if log_interval_s > 0 else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()

    app = FastAPI(title="furiosa-llm OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.state.server = state

    # -- errors ---------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return error_json(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        parts = []
        param = None
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            param = param or loc or None
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return error_json(400, "; ".join(parts) or "invalid request", "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        kind = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(exc.status_code, "invalid_request_error")
        return error_json(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(AsyncEngineDeadError)
    async def _dead(_request: Request, exc: AsyncEngineDeadError):
        return error_json(503, f"the engine is not running: {exc}", "ServiceUnavailableError")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return error_json(401, "Unauthorized: a valid API key is required (Authorization: Bearer <key>)",
                                  "AuthenticationError", code="invalid_api_key")
        return await call_next(request)

    # -- plain endpoints ------------------------------------------------------------------------
    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        try:
            await engine.check_health()
        except AsyncEngineDeadError as e:
            return error_json(503, f"the engine is not running: {e}", "ServiceUnavailableError")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version", response_model=VersionResponse)
    async def version():
        return VersionResponse(version=__version__)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models():
        return ModelList(data=[ModelCard(id=state.model_name, root=engine.model_path, max_model_len=state.max_model_len)])

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(req: TokenizeRequest):
        _check_model(state, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            ids = _chat_prompt_ids(state, req.messages, bool(req.add_generation_prompt), False, None, None)
        else:
            ids = state.tokenizer(req.prompt, add_special_tokens=bool(req.add_special_tokens)).input_ids
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(req: DetokenizeRequest):
        _check_model(state, req.model)
        bad = [t for t in req.tokens if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"tokens: ids {bad[:5]} are outside the vocabulary [0, {state.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens))

    # -- completions ------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(req: CompletionRequest, raw: Request):
        _check_model(state, req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, f"best_of={req.best_of}: only 1 is supported", param="best_of")
        prompts = _completion_prompts(req.prompt)
        stream = bool(req.stream)
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL
        params = _sampling_params(req, 16 if req.max_tokens is None else req.max_tokens, kind, req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        gens = [engine.generate(p, params, f"{rid}-{i}") for i, p in enumerate(prompts)]

        async def respond():
            first = await _start(gens)
            if stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return EventStream(_stream_completion(state, req, rid, gens, first, include_usage))
            return await _full_completion(state, req, rid, gens, first)

        return await _unless_disconnected(raw, respond(), state.metrics.aborted)

    # -- chat ---------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        _check_model(state, req.model)
        if req.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise APIError(400, f"response_format={req.response_format.get('type')!r}: only 'text' is supported",
                           param="response_format")
        ids = _chat_prompt_ids(state, req.messages, bool(req.add_generation_prompt), bool(req.continue_final_message),
                               req.chat_template, req.chat_template_kwargs)
        stream = bool(req.stream)
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, state.max_model_len - len(ids))
        top = req.top_logprobs or 0
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        params = _sampling_params(req, max_tokens, kind, top if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gens = [engine.generate({"prompt_token_ids": ids}, params, rid)]

        async def respond():
            first = await _start(gens)
            if stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return EventStream(_stream_chat(state, req, rid, gens, first, include_usage))
            return await _full_chat(state, req, rid, gens[0], first[0])

        return await _unless_disconnected(raw, respond(), state.metrics.aborted)

    return app


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
                     template: str | None, template_kwargs: dict | None) -> list[int]:
    if not messages:
        raise APIError(400, "messages: must not be empty", param="messages")
    conv = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        conv.append({"role": m.role, "content": content or ""})
    template = template or state.chat_template
    if template is None and not getattr(state.tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; start the server with --chat-template", param="messages")
    try:
        ids = state.tokenizer.apply_chat_template(
            conv, tokenize=True, add_generation_prompt=add_generation_prompt and not continue_final,
            continue_final_message=continue_final, chat_template=template, **(template_kwargs or {}))
    except Exception as e:  # noqa: BLE001 - a template error is the request's (or the template's) fault
        raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None
    if hasattr(ids, "keys"):  # a BatchEncoding in recent transformers
        ids = ids["input_ids"]
    return list(ids)


async def _start(gens: list) -> list[RequestOutput]:
    """Add every request and wait for its first output, so bad input is a 400 before any byte is sent."""
    firsts: list[RequestOutput] = []
    try:
        for g in gens:
            firsts.append(await g.__anext__())
    except ValueError as e:
        for g in gens:
            await g.aclose()
        raise APIError(400, str(e), param="prompt" if "prompt" in str(e) else None) from None
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


def _observe(state: ServerState, out: RequestOutput, num_generated: int) -> None:
    c = out.outputs[0]
    state.metrics.observe(len(out.prompt_token_ids), num_generated, c.finish_reason, out.metrics)


async def _full_completion(state: ServerState, req: CompletionRequest, rid: str, gens, first) -> CompletionResponse:
    finals: dict[int, RequestOutput] = {}
    async for i, out in _merge([_rest(g, f) for g, f in zip(gens, first)]):
        if out.finished:
            finals[i] = out
    choices, n_prompt, n_out = [], 0, 0
    for i in range(len(gens)):
        out = finals[i]
        c = out.outputs[0]
        prefix = (out.prompt or state.tokenizer.decode(out.prompt_token_ids)) if req.echo else ""
        lp = _completion_logprobs(state.tokenizer, c, req.logprobs, len(prefix)) if req.logprobs is not None else None
        choices.append(CompletionChoice(index=i, text=prefix + c.text, logprobs=lp, finish_reason=c.finish_reason,
                                        stop_reason=c.stop_reason))
        n_prompt += len(out.prompt_token_ids)
        n_out += len(c.token_ids)
        _observe(state, out, len(c.token_ids))
    return CompletionResponse(id=rid, model=state.model_name, choices=choices, usage=_usage(n_prompt, n_out))


async def _stream_completion(state: ServerState, req: CompletionRequest, rid: str, gens, first, include_usage: bool):
    created = int(time.time())
    n_prompt = n_out = 0
    num_finished = 0
    counts = [0] * len(gens)
    echoed = [not req.echo] * len(gens)
    offsets = [0] * len(gens)
    try:
        async for i, out in _merge([_rest(g, f) for g, f in zip(gens, first)]):
            c = out.outputs[0]
            text = c.text
            if not echoed[i]:
                text = (out.prompt or state.tokenizer.decode(out.prompt_token_ids)) + text
                echoed[i] = True
            counts[i] += len(c.token_ids)
            lp = None
            if req.logprobs is not None:
                lp = _completion_logprobs(state.tokenizer, c, req.logprobs, offsets[i])
            offsets[i] += len(text)
            chunk = CompletionResponse(id=rid, created=created, model=state.model_name, choices=[
                CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
            yield _sse(chunk)
            if out.finished:
                num_finished += 1
                n_prompt += len(out.prompt_token_ids)
                n_out += counts[i]
                _observe(state, out, counts[i])
        if include_usage:
            yield _sse(CompletionResponse(id=rid, created=created, model=state.model_name, choices=[],
                                          usage=_usage(n_prompt, n_out)))
        yield "data: [DONE]\n\n"
    except AsyncEngineDeadError as e:
        yield _sse(error_body(503, f"the engine is not running: {e}", "ServiceUnavailableError"))
    finally:
        if num_finished < len(gens):
            state.metrics.aborted(len(gens) - num_finished)


async def _full_chat(state: ServerState, req: ChatCompletionRequest, rid: str, gen, first) -> ChatCompletionResponse:
    out = first
    async for out in _rest(gen, first):
        pass
    c = out.outputs[0]
    lp = _chat_logprobs(state.tokenizer, c.token_ids, c.logprobs, req.top_logprobs or 0) if req.logprobs else None
    _observe(state, out, len(c.token_ids))
    return ChatCompletionResponse(
        id=rid, model=state.model_name,
        choices=[ChatChoice(index=0, message=ChatResponseMessage(content=c.text), logprobs=lp,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason)],
        usage=_usage(len(out.prompt_token_ids), len(c.token_ids)))


async def _stream_chat(state: ServerState, req: ChatCompletionRequest, rid: str, gens, first, include_usage: bool):
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    n_out = 0
    out = first[0]
    finished = False
    try:
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
        async for out in _rest(gens[0], first[0]):
            c = out.outputs[0]
            n_out += len(c.token_ids)
            lp = None
            if req.logprobs:
                lp = _chat_logprobs(state.tokenizer, c.token_ids, c.logprobs, req.top_logprobs or 0).model_dump()
            if c.text or c.finish_reason is not None or lp:
                yield _sse({**base, "choices": [{"index": 0, "delta": {"content": c.text} if c.text else {},
                                                 "logprobs": lp, "finish_reason": c.finish_reason,
                                                 "stop_reason": c.stop_reason}]})
        finished = out.finished
        _observe(state, out, n_out)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(len(out.prompt_token_ids), n_out).model_dump()})
        yield "data: [DONE]\n\n"
    except AsyncEngineDeadError as e:
        yield _sse(error_body(503, f"the engine is not running: {e}", "ServiceUnavailableError"))
    finally:
        if not finished:
            state.metrics.aborted()

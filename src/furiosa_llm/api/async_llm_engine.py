"""AsyncLLMEngine: streams RequestOutputs from a background engine loop.

The constructor has the seed's shape: ``native_engine`` is this project's ``NativeEngine`` (or
anything with its ``add_request``/``step``/``abort_request``/``has_unfinished_requests``/
``shutdown``, such as an ``LLMEngine``). The loop runs the native engine's ``step`` on one worker
thread so the event loop stays responsive;
each request has an asyncio queue its ``generate()`` reads. A consumer that stops iterating
aborts its request inside ``generate()`` itself, freeing its KV blocks. An exception in the
loop reaches every waiting stream and marks the engine dead.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncGenerator

from .engine_args import AsyncEngineArgs
from .inputs import PromptType
from .native_engine import NativeEngine, SeedEngine
from .outputs import PoolingParams, PoolingRequestOutput, RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger("furiosa_llm")


class AsyncEngineDeadError(RuntimeError):
    """The engine loop died; the original exception is the ``__cause__``."""


class RequestFailedError(RuntimeError):
    """The step that computed this request failed; the message names the cause. Other requests go on."""

    def __init__(self, request_id: str, error: str | None) -> None:
        super().__init__(f"request {request_id!r} failed: {error or 'unknown error'}")
        self.request_id = request_id
        self.error = error


class AsyncLLMEngine(SeedEngine):
    def __init__(self, native_engine: NativeEngine, tokenizer=None, task_type: str = "generate",
                 max_model_len: int | None = None, llm=None, model_path: str | None = None,
                 trust_remote_code: bool = False) -> None:
        super().__init__(native_engine, tokenizer, task_type, max_model_len, llm, model_path, trust_remote_code)
        self._queues: dict[str, asyncio.Queue] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-loop")
        self._input_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-input")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._dead: BaseException | None = None
        self._closed = False

    @classmethod
    def from_engine_args(cls, args: AsyncEngineArgs) -> "AsyncLLMEngine":
        if (args.data_parallel_size or 1) > 1:  # replicas as Ray actors behind one front (extra [ray])
            from .data_parallel import DataParallelEngine

            engine = DataParallelEngine(args)
        else:
            engine = NativeEngine(args)
        return cls(engine, engine.tokenizer, getattr(engine, "task", "generate"), engine.max_model_len,
                   model_path=args.model)

    @classmethod
    def from_llm(cls, llm) -> "AsyncLLMEngine":
        """An engine over the ``LLM``'s native engine (the model is not loaded again)."""
        return cls(llm.engine, llm.tokenizer, llm.task_type, llm.max_model_len, llm=llm)

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams`` with the model's ``generation_config`` defaults (plain defaults when it sets none)."""
        return self.native_engine.get_default_sampling_params()

    def get_diff_sampling_param(self) -> dict:
        """The model's ``generation_config`` sampling defaults as ``SamplingParams`` keywords (vLLM's name)."""
        return self.native_engine.get_diff_sampling_param()

    # ---- health ------------------------------------------------------------------------------
    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def dead_error(self) -> AsyncEngineDeadError:
        err = AsyncEngineDeadError(f"the engine loop died: {self._dead!r}" if self._dead else "the engine is shut down")
        err.__cause__ = self._dead
        return err

    async def check_health(self) -> None:
        if self._dead is not None or self._closed:
            raise self.dead_error

    # ---- the loop ----------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._dead is not None or self._closed:
            raise self.dead_error
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="furiosa-llm-engine-loop")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.native_engine
        try:
            while not self._closed:
                if not engine.has_unfinished_requests():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._deliver(await loop.run_in_executor(self._executor, engine.step))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - every waiting stream must hear of it
            logger.exception("engine loop died")
            self._dead = e
            for q in self._queues.values():
                q.put_nowait(e)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str) -> AsyncGenerator[RequestOutput, None]:
        if getattr(self.native_engine, "task", "generate") == "embed":
            raise ValueError(f"generate(): model {self.model_path!r} is an embedding model (task 'embed'); "
                             "it pools and cannot generate: use encode()")
        q = await self._start(request_id, lambda: self.native_engine.add_request(request_id, prompt, sampling_params))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise self.dead_error
                finished = item.finished
                if finished and item.outputs[0].finish_reason == "error":
                    raise RequestFailedError(request_id, item.error)
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            self.request_ids.discard(request_id)
            if not finished:
                self.native_engine.abort_request(request_id)

    async def _start(self, request_id: str, add) -> asyncio.Queue:
        """Open the stream of ``request_id`` and add its request with ``add()``; returns the stream's queue.

        The queue exists before the request does, so none of its outputs can be missed; ``add`` runs on
        a worker thread, so tokenizing a long prompt never blocks the event loop. ``ValueError`` on a
        bad or duplicate id and whatever ``add`` raises (bad input).
        """
        self._ensure_loop()
        if not isinstance(request_id, str):
            raise ValueError(f"request_id={request_id!r}: must be a str")
        if request_id in self._queues:
            raise ValueError(f"request_id={request_id!r}: a live request already has this id")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        added = asyncio.get_running_loop().run_in_executor(self._input_executor, add)
        try:
            await asyncio.shield(added)
        except asyncio.CancelledError:  # the caller went away while its prompt was being processed
            self._queues.pop(request_id, None)
            added.add_done_callback(lambda f: f.cancelled() or f.exception() is not None
                                    or self.native_engine.abort_request(request_id))
            raise
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self.request_ids.add(request_id)
        self._wake.set()
        return q

    def encode(self, prompt: PromptType, pooling_params: PoolingParams | None, request_id: str, lora_request=None,
               trace_headers=None, priority=None, truncate_prompt_tokens: int | None = None,
               tokenization_kwargs=None) -> AsyncGenerator[PoolingRequestOutput, None]:
        """Pool ``prompt`` on an embedding model: yields one finished ``PoolingRequestOutput``.

        ``lora_request``, ``trace_headers``, ``priority`` and ``tokenization_kwargs`` are accepted and
        ignored (vLLM's placeholders). An aborted request's stream ends without an output; a failed
        step raises ``RequestFailedError``. ``ValueError`` on a generative model or bad input.
        """
        if getattr(self.native_engine, "task", "generate") != "embed":
            raise ValueError(
                f"encode(): model {self.model_path!r} is a generative model (task_type={self.task_type!r}); "
                "pooling needs an embedding model (e.g. all-minilm-l6-v2): use generate()"
            )  # at the call, before iterating: the seed's encode() raised here too
        return self._encode(prompt, pooling_params, request_id, truncate_prompt_tokens)

    async def _encode(self, prompt: PromptType, pooling_params: PoolingParams | None, request_id: str,
                      truncate_prompt_tokens: int | None) -> AsyncGenerator[PoolingRequestOutput, None]:
        q = await self._start(request_id, lambda: self.native_engine.add_pooling_request(
            request_id, prompt, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens))
        finished = False
        try:
            item = await q.get()
            if isinstance(item, BaseException):
                raise self.dead_error
            finished = True
            if item.error is not None:
                raise RequestFailedError(request_id, item.error)
            if not item.aborted:
                yield item
        finally:
            self._queues.pop(request_id, None)
            self.request_ids.discard(request_id)
            if not finished:
                self.native_engine.abort_request(request_id)

    async def abort(self, request_id: str) -> None:
        """End a live request with finish_reason "abort"; an unknown id is harmless."""
        self._deliver(self.native_engine.abort_request(request_id))

    def shutdown(self) -> None:
        """Abort every live request (their streams end with "abort") and stop the loop."""
        if self._closed:
            return
        self._deliver(self.native_engine.abort_request(list(self._queues)))
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None and not self._task.done() and self._loop is not None and not self._loop.is_closed():
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._input_executor.shutdown(wait=False, cancel_futures=True)
        self.native_engine.shutdown()

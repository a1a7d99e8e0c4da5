"""LLMEngine: the synchronous engine, in the seed's constructor shape.

``LLMEngine(native_engine, tokenizer, task_type, max_model_len, llm=None, model_path=None,
trust_remote_code=False)`` as Furiosa-LLM's, where ``native_engine`` is this project's
``NativeEngine`` (the engine core over a HAL queue with the input and output processors). The first
argument may also be an ``EngineArgs``: ``LLMEngine(args)`` builds the native engine, the same as
``LLMEngine.from_engine_args(args)``. ``add_request`` queues a request, ``step`` runs one engine step
and returns its ``RequestOutput``s, ``abort_request`` ends requests at once; ``request_ids`` holds
the live requests added through this engine.

Attributes this class does not define (``core``, ``runner``, ``stats()``, ``vocab_size``,
``num_free_blocks``, ...) are the native engine's.
"""

from __future__ import annotations

from typing import Any

from .engine_args import EngineArgs
from .input_processor import PromptTooLongError  # noqa: F401 - public here
from .inputs import PromptType
from .native_engine import EngineDeadError, NativeEngine, SeedEngine  # noqa: F401 - EngineDeadError is public here
from .outputs import PoolingParams, RequestOutput
from .sampling_params import SamplingParams


class LLMEngine(SeedEngine):
    def __init__(self, native_engine: NativeEngine | EngineArgs, tokenizer: Any = None, task_type: str = "generate",
                 max_model_len: int | None = None, llm: Any = None, model_path: str | None = None,
                 trust_remote_code: bool = False, *, queue=None) -> None:
        if isinstance(native_engine, EngineArgs):
            model_path = model_path or native_engine.model
            if (native_engine.data_parallel_size or 1) > 1 and queue is None:  # replicas as Ray actors (extra [ray])
                from .data_parallel import DataParallelEngine

                native_engine = DataParallelEngine(native_engine)
            else:
                native_engine = NativeEngine(native_engine, queue=queue)
        super().__init__(native_engine, tokenizer, task_type, max_model_len, llm, model_path, trust_remote_code)

    def __getattr__(self, name: str):
        if name == "native_engine":  # not set yet: construction failed
            raise AttributeError(name)
        return getattr(self.native_engine, name)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    @classmethod
    def from_llm(cls, llm) -> "LLMEngine":
        """An engine over the ``LLM``'s native engine (the model is not loaded again)."""
        return cls(llm.engine, llm.tokenizer, llm.task_type, llm.max_model_len, llm=llm)

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams`` with the model's ``generation_config`` defaults (plain defaults when it sets none)."""
        return self.native_engine.get_default_sampling_params()

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. ``ValueError`` for a bad id, prompt or parameters, a live duplicate id,
        or a ``PoolingParams`` on this generative model."""
        self.native_engine.add_request(request_id, prompt, params, arrival_time)
        self.request_ids.add(request_id)

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        """Abort live requests, freeing their KV blocks now; returns their final outputs. Unknown ids are harmless."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.request_ids.difference_update(ids)
        return self.native_engine.abort_request(ids)

    def has_unfinished_requests(self) -> bool:
        return self.native_engine.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.native_engine.get_num_unfinished_requests()

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step. Requests of a batch that failed end with finish reason "error"; the rest go on.

        Raises ``EngineDeadError`` once steps have failed several times in a row.
        """
        outputs = self.native_engine.step()
        for out in outputs:
            if out.finished:
                self.request_ids.discard(out.request_id)
        return outputs

    def shutdown(self) -> None:
        """Abort every live request and close the engine; a second call does nothing."""
        self.request_ids.clear()
        self.native_engine.shutdown()

"""LLMEngine: the synchronous engine. Wiring of a backend, the engine core and the output processor.

``add_request`` queues a request (``InputProcessor`` validates it and builds the core's
``Request``), ``step`` runs one core step and turns its outputs into ``RequestOutput``s
(``OutputProcessor``), ``abort_request`` ends requests at once. The torch backend
(``hal.torch_backend``) loads the model and makes the execution queue; ``EngineArgs.engine_config``
is the core's configuration.
"""

from __future__ import annotations

import logging
import time

from furiosa_llm.core import EngineCore, EngineStats
from furiosa_llm.hal import ExecutionQueue

from .engine_args import EngineArgs
from .input_processor import InputProcessor, PromptTooLongError  # noqa: F401 - PromptTooLongError is public here
from .inputs import PromptType
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger("furiosa_llm")


class EngineDeadError(RuntimeError):
    """Steps failed ``EngineCore.MAX_CONSECUTIVE_FAILURES`` times in a row; the last failure is the ``__cause__``."""


class LLMEngine:
    def __init__(self, args: EngineArgs, *, queue: ExecutionQueue | None = None) -> None:
        from furiosa_llm.hal.torch_backend import TorchBackend

        self.args = args
        backend = TorchBackend(
            args.model, devices=args.parsed_devices(), pipeline_parallel_size=args.pipeline_parallel_size,
            data_parallel_size=args.data_parallel_size, dtype=args.dtype, block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes, tokenizer=args.tokenizer,
            tokenizer_mode=args.tokenizer_mode, revision=args.revision, cache_dir=args.cache_dir, seed=args.seed,
        )
        self.backend = backend
        self.load_seconds = backend.load_seconds
        self.model_config = backend.model_config
        self.tokenizer = backend.tokenizer
        self.vocab_size = backend.model_config.vocab_size
        self.eos_token_ids = backend.eos_token_ids
        config = args.engine_config(num_blocks=backend.num_blocks_that_fit, model_max_len=backend.max_position_embeddings)
        self.engine_config = config
        self.max_model_len = config.scheduler_config.max_model_len
        queue = queue or backend.create_queue(config.scheduler_config.num_blocks, config.npu_queue_limit, config.jit_config.max_workers)
        self.core = EngineCore.from_config(config, queue, time.monotonic, eos_token_ids=self.eos_token_ids,
                                           num_layers=backend.num_layers)
        self.input_processor = InputProcessor(self.tokenizer, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                                              max_logprobs=args.max_logprobs, eos_token_ids=self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        if config.jit_config.enabled:
            logger.info("JIT on: decode buckets compile after %d hits, %d at once, %d layers per unit (backend %s)",
                        config.jit_config.threshold, config.jit_config.max_workers, config.jit_config.unit_size, backend.jit_backend)
        logger.info("engine ready: %d KV blocks x %d tokens, max_model_len=%d, npu_queue_limit=%d",
                    config.scheduler_config.num_blocks, args.block_size, self.max_model_len, config.npu_queue_limit)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def runner(self):
        """The torch backend's model runner (None before its queue exists)."""
        return self.backend.runner

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. ``ValueError`` for a bad id, prompt or parameters, or a live duplicate id."""
        text, params, req = self.input_processor.process(request_id, prompt, sampling_params, arrival_time)
        with self.core.lock:
            self.core.add_request(req)  # raises on a duplicate live id
            self.output_processor.add(request_id, text, req.prompt_token_ids, params, req.metrics)

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        """Abort live requests, freeing their KV blocks now; returns their final outputs."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        outs = []
        with self.core.lock:
            for rid in ids:
                if self.core.abort(rid) is not None:
                    out = self.output_processor.abort(rid)
                    if out is not None:
                        outs.append(out)
        return outs

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return self.core.num_unfinished

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step. Requests of a batch that failed end with finish reason "error"; the rest go on.

        Raises ``EngineDeadError`` once steps have failed several times in a row.
        """
        core_outputs = self.core.step()
        with self.core.lock:
            processed = self.output_processor.process(core_outputs)
            for rid, stop in processed.stopped:
                self.core.stop(rid, stop)
            for rid in processed.failed:
                self.core.abort(rid)
        if self.core.dead:
            err = self.core.last_error
            raise EngineDeadError(f"{self.core.consecutive_failures} engine steps failed in a row; last: {err!r}") from err
        return processed.request_outputs

    # ---- state --------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot of the engine core: requests running and waiting, KV blocks, counters."""
        return self.core.stats()

    @property
    def num_free_blocks(self) -> int:
        st = self.core.stats()
        return st.num_kv_blocks_total - st.num_kv_blocks_used

    @property
    def num_total_blocks(self) -> int:
        return self.core.stats().num_kv_blocks_total

    def shutdown(self) -> None:
        with self.core.lock:
            for rid in list(self.output_processor.states):
                self.core.abort(rid)
            self.output_processor.states.clear()
        self.core.queue.close()

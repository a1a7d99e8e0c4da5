"""NativeEngine: this project's engine behind the seed's ``native_engine`` seam.

The vendor's ``AsyncLLMEngine``/``LLMEngine`` take a ``native_engine`` (its ``NativeLLMEngine``,
which owns batching and the KV cache on the card). Here the native engine is the engine core over
a HAL queue (the torch backend by default), with the input processor (validating a request,
building the core's ``Request``) and the output processor (detokenizing, stop strings, logprobs,
output kinds). Its methods are the ones ``LLMEngine`` and ``AsyncLLMEngine`` drive:
``add_request``, ``step``, ``abort_request``, ``has_unfinished_requests``, ``shutdown``, plus
``stats()`` and the model's sampling defaults (``get_default_sampling_params``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from furiosa_llm.core import EngineCore, EngineStats
from furiosa_llm.hal import ExecutionQueue

from .engine_args import EngineArgs
from .input_processor import InputProcessor
from .inputs import PromptType
from .output_processor import OutputProcessor
from .outputs import PoolingParams, RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger("furiosa_llm")

# generation_config.json field -> SamplingParams field, as vLLM reads a model's sampling defaults
GENERATION_CONFIG_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


class EngineDeadError(RuntimeError):
    """Steps failed ``EngineCore.MAX_CONSECUTIVE_FAILURES`` times in a row; the last failure is the ``__cause__``."""


def generation_defaults(generation_config: Any) -> dict[str, Any]:
    """The sampling defaults a model's ``generation_config`` sets, as ``SamplingParams`` keywords.

    Only fields the model sets away from Hugging Face's defaults count (``to_diff_dict``), as in
    vLLM and Furiosa-LLM; ``max_new_tokens`` becomes ``max_tokens``. A value ``SamplingParams``
    refuses is logged and left out. ``None`` (no generation config) gives ``{}``.
    """
    if generation_config is None:
        return {}
    diff = generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else dict(generation_config)
    out: dict[str, Any] = {}
    for src, dst in GENERATION_CONFIG_FIELDS.items():
        value = diff.get(src)
        if value is None:
            continue
        try:
            SamplingParams(**{dst: value})
        except ValueError as e:
            logger.warning("generation_config: %s=%r ignored: %s", src, value, e)
            continue
        out[dst] = value
    return out


def uses_rngd(args: EngineArgs) -> bool:
    """Whether ``args`` run on RNGD: NPU devices given, or none given and ``furiosa_smi`` finds free PEs."""
    devices = args.parsed_devices()
    if devices is not None:
        return any(d.kind == "npu" for d in devices)
    from furiosa_llm.hal.discovery import available_npu_devices

    return bool(available_npu_devices())


class NativeEngine:
    """The engine core, its backend and the two processors; the ``native_engine`` of both engines.

    ``tokenizer``: a tokenizer object to use instead of the one loaded with the model (as
    Furiosa-LLM's ``LLM(tokenizer=...)`` allows). ``queue``: an execution queue to use instead of
    the backend's (tests).
    """

    def __new__(cls, args: EngineArgs | None = None, **kw: Any):
        """On RNGD devices (``--devices npu:...``, or none given and ``furiosa_smi`` finds free PEs) the
        native engine is the vendor's, through ``RngdEngine`` (``api/rngd_engine.py``); else this class."""
        if cls is NativeEngine and args is not None and kw.get("queue") is None and uses_rngd(args):
            from .rngd_engine import RngdEngine

            return RngdEngine(args, tokenizer=kw.get("tokenizer"))
        return super().__new__(cls)

    def __init__(self, args: EngineArgs, *, tokenizer: Any = None, queue: ExecutionQueue | None = None) -> None:
        from furiosa_llm.hal.torch_backend import TorchBackend

        if getattr(args, "fxb", None) is not None:
            raise ValueError(f"fxb={args.fxb!r}: an FXB bundle runs only on RNGD (--devices npu:...); "
                             f"devices={args.devices!r} run the model folder itself")
        self.args = args
        backend = TorchBackend(
            args.model, devices=args.parsed_devices(), pipeline_parallel_size=args.pipeline_parallel_size,
            data_parallel_size=args.data_parallel_size, dtype=args.dtype, block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes, tokenizer=args.tokenizer,
            tokenizer_mode=args.tokenizer_mode, revision=args.revision, cache_dir=args.cache_dir, seed=args.seed,
            task=args.requested_task, pooling_type=args.pooling_type,
            quantization=args.quantization,
        )
        self.backend = backend
        self.load_seconds = backend.load_seconds
        self.model_config = backend.model_config
        self.tokenizer = tokenizer if tokenizer is not None else backend.tokenizer
        self.vocab_size = backend.model_config.vocab_size
        self.eos_token_ids = backend.eos_token_ids
        self.task = backend.task  # "generate", or "embed" for an encoder model or a decoder served as an embedder
        self.pooling_config = backend.pooling_config
        self.hidden_size = backend.model_config.hidden_size
        if self.task == "embed" and args.enable_jit_compilation:
            raise ValueError(f"enable_jit_compilation=True: model {args.model!r} is an embedding model (task 'embed'); "
                             "JIT compiles decode steps, which it never runs")
        self.default_sampling_kwargs = generation_defaults(backend.generation_config) if self.task == "generate" else {}
        config = args.engine_config(num_blocks=backend.num_blocks_that_fit, model_max_len=backend.max_position_embeddings)
        self.engine_config = config
        self.max_model_len = config.scheduler_config.max_model_len
        sc = config.scheduler_config
        queue = queue or backend.create_queue(
            sc.num_blocks, config.npu_queue_limit, config.jit_config.max_workers, max_model_len=sc.max_model_len,
            max_num_seqs=sc.max_processing_samples, batch_edges=config.jit_config.batch_edges,
            enforce_eager=args.enforce_eager)
        self.core = EngineCore.from_config(config, queue, time.monotonic, eos_token_ids=self.eos_token_ids,
                                           num_layers=backend.num_layers)
        self.input_processor = InputProcessor(self.tokenizer, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                                              max_logprobs=args.max_logprobs, eos_token_ids=self.eos_token_ids,
                                              structured_outputs_backend=args.structured_outputs_backend)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._closed = False
        if config.jit_config.enabled:
            logger.info("JIT on: decode buckets compile after %d hits, %d at once, %d layers per unit (backend %s)",
                        config.jit_config.threshold, config.jit_config.max_workers, config.jit_config.unit_size, backend.jit_backend)
        if self.default_sampling_kwargs:
            logger.info("sampling defaults from the model's generation_config: %s", self.default_sampling_kwargs)
        logger.info("engine ready: %d KV blocks x %d tokens, max_model_len=%d, npu_queue_limit=%d",
                    config.scheduler_config.num_blocks, args.block_size, self.max_model_len, config.npu_queue_limit)

    @property
    def runner(self):
        """The torch backend's model runner (None before its queue exists)."""
        return self.backend.runner

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams`` with the model's ``generation_config`` defaults; plain defaults when it sets none."""
        return SamplingParams(**self.default_sampling_kwargs)

    def get_diff_sampling_param(self) -> dict[str, Any]:
        """The model's sampling defaults as keywords (vLLM's name): a server fills a request's unset fields from it."""
        return dict(self.default_sampling_kwargs)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. ``ValueError`` for a bad id, prompt or parameters, or a live duplicate id.

        ``RuntimeError`` once the engine is shut down.
        """
        if self._closed:
            raise RuntimeError("the engine is shut down (shutdown() was called); create a new one to serve requests")
        if self.task == "embed":
            if params is not None and not isinstance(params, PoolingParams):
                raise ValueError(
                    f"params={type(params).__name__}(...): model {self.args.model!r} is an embedding model "
                    "(task 'embed'): it pools and cannot generate; pass a PoolingParams (encode/embed)"
                )
            self.add_pooling_request(request_id, prompt, params, arrival_time=arrival_time)
            return
        if isinstance(params, PoolingParams):
            raise ValueError(
                f"params=PoolingParams(...): model {self.args.model!r} is a generative model (task 'generate'); "
                "pooling needs an embedding model (e.g. all-minilm-l6-v2); pass a SamplingParams"
            )
        text, params, req = self.input_processor.process(request_id, prompt, params, arrival_time)
        with self.core.lock:
            self.core.add_request(req)  # raises on a duplicate live id
            self.output_processor.add(request_id, text, req.prompt_token_ids, params, req.metrics)

    def add_pooling_request(self, request_id: str, prompt: PromptType, params: PoolingParams | None = None, *,
                            truncate_prompt_tokens: int | None = None, arrival_time: float | None = None) -> None:
        """Queue a pooling request on an embedding model; its one output is a ``PoolingRequestOutput``."""
        if self._closed:
            raise RuntimeError("the engine is shut down (shutdown() was called); create a new one to serve requests")
        if self.task != "embed":
            raise ValueError(
                f"encode(): model {self.args.model!r} is a generative model (task 'generate'); pooling needs an "
                "embedding model (e.g. all-minilm-l6-v2)"
            )
        _text, params, req = self.input_processor.process_pooling(
            request_id, prompt, params, hidden_size=self.hidden_size, pooling_type=self.pooling_config.pooling_type,
            truncate_prompt_tokens=truncate_prompt_tokens, arrival_time=arrival_time)
        with self.core.lock:
            self.core.add_request(req)  # raises on a duplicate live id or a prompt over the token budget
            self.output_processor.add_pooling(request_id, req.prompt_token_ids, params)

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

        Raises ``EngineDeadError`` once steps kept failing and the device failed a probe too (and
        on every step after that).
        """
        if self.core.dead:
            raise self._dead_error()
        core_outputs = self.core.step()
        with self.core.lock:
            processed = self.output_processor.process(core_outputs)
            for rid, stop in processed.stopped:
                self.core.stop(rid, stop)
            for rid in processed.failed:
                self.core.abort(rid)
        if self.core.dead:
            raise self._dead_error()
        return processed.request_outputs

    def _dead_error(self) -> EngineDeadError:
        err = self.core.last_error
        dead = EngineDeadError(f"engine steps failed {self.core.MAX_CONSECUTIVE_FAILURES} times in a row and the device "
                               f"failed a probe; last error: {err!r}")
        dead.__cause__ = err
        return dead

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

    def is_alive(self) -> bool:
        return not self._closed and not self.core.dead

    def shutdown(self) -> None:
        """Abort every live request and close the execution queue; a second call does nothing."""
        if self._closed:
            return
        with self.core.lock:
            for rid in [*self.output_processor.states, *self.output_processor.pooling]:
                self.core.abort(rid)
            self.output_processor.states.clear()
            self.output_processor.pooling.clear()
        self._closed = True
        self.core.queue.close()


class SeedEngine:
    """What ``LLMEngine`` and ``AsyncLLMEngine`` keep from the seed's constructor:
    ``native_engine, tokenizer, task_type, max_model_len, llm=None, model_path=None, trust_remote_code=False``.

    ``tokenizer`` and ``max_model_len`` default to the native engine's; ``model_path`` to the ``LLM``'s model.
    """

    def __init__(self, native_engine: NativeEngine, tokenizer: Any = None, task_type: str = "generate",
                 max_model_len: int | None = None, llm: Any = None, model_path: str | None = None,
                 trust_remote_code: bool = False) -> None:
        self.native_engine = native_engine
        self.tokenizer = tokenizer if tokenizer is not None else native_engine.tokenizer
        self.task_type = task_type
        self.max_model_len = max_model_len or native_engine.max_model_len
        self.llm = llm
        self.model_path = model_path or (getattr(llm, "model_id_or_path", None) if llm is not None else None)
        self.trust_remote_code = trust_remote_code
        self.request_ids: set[str] = set()

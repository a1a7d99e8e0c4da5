"""RngdEngine: the vendor engine on RNGD cards behind the seed's ``native_engine`` seam.

It has ``NativeEngine``'s methods (``add_request``, ``step``, ``abort_request``,
``has_unfinished_requests``, ``shutdown``, ``is_alive``, ``stats``, the sampling defaults), so
``LLM``, ``LLMEngine``, ``AsyncLLMEngine`` and the server drive it unchanged. Our side keeps what
Furiosa-LLM's Python side keeps: tokenizing and request validation (``InputProcessor``),
incremental detokenizing, stop strings, logprobs and output kinds (``OutputProcessor``). A stop
string that matches aborts the native request and drains it (its later tokens are dropped), as
Furiosa-LLM does. The vendor engine (``hal/rngd.py``) schedules, batches and holds the KV cache.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from furiosa_llm.core import CoreOutput, EngineStats, RequestMetrics
from furiosa_llm.hal.rngd import NativeEncoding, NativeSamplingParams, RngdRunner, prepare
from furiosa_llm.hal.rngd_knobs import NATIVE_VERSION, check_sampling

from .engine_args import EngineArgs
from .input_processor import InputProcessor
from .inputs import PromptType
from .native_engine import EngineDeadError, generation_defaults
from .output_processor import OutputProcessor
from .outputs import PoolingParams, RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger("furiosa_llm")

POLL_S = 0.05  # how long one step waits for the vendor engine before returning no outputs


def _load_tokenizer(args: EngineArgs, model_dir: Path, tokenizer: Any):
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    src = args.tokenizer or str(model_dir)
    try:
        return AutoTokenizer.from_pretrained(src, use_fast=args.tokenizer_mode != "slow", revision=args.revision)
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's artifact
        raise ValueError(f"tokenizer={src!r}: could not load a tokenizer from the model artifact ({e}); "
                         "pass --tokenizer") from e


def _generation_config(model_dir: Path):
    if not (model_dir / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(model_dir))


class RngdEngine:
    """``native_engine`` over ``furiosa-llm-native`` on RNGD. ``native_factory``/``smi``: fakes (tests)."""

    task = "generate"

    def __init__(self, args: EngineArgs, *, tokenizer: Any = None, native_factory: Callable[..., Any] | None = None,
                 smi: Any = None) -> None:
        t0 = time.monotonic()
        self.args = args
        plan = prepare(args, smi=smi)  # every check that needs no card: milliseconds
        self.artifact = plan.artifact
        self.native_config = plan.config
        self.device = plan.config.ctor["devices"].split(",")[0]  # the leader device (server metrics label)
        self.runner = RngdRunner.open(plan, native_factory)  # the driver's error comes before any slow loading
        try:
            self._load(args, plan, tokenizer)
        except BaseException:
            self.runner.shutdown()
            raise
        self.input_processor = InputProcessor(self.tokenizer, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                                              max_logprobs=args.max_logprobs, eos_token_ids=self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._first: set[str] = set()  # live requests that have not had an output yet
        self._lock = threading.Lock()  # add/abort (caller threads) against step (the engine loop's thread)
        self._counts = {"prompt": 0, "generated": 0, "cached": 0, "steps": 0}
        self._closed = False
        self._dead: EngineDeadError | None = None
        self.token_log: list[tuple[str, int, float]] | None = None  # (request id, new tokens, arrival): calibration
        self.load_seconds = time.monotonic() - t0
        logger.info("RNGD engine ready on %s (furiosa-llm-native %s, FXB %s, max_model_len=%d) in %.2f s",
                    plan.config.ctor["devices"], NATIVE_VERSION, plan.artifact.fxb_path.name, self.max_model_len,
                    self.load_seconds)

    def _load(self, args: EngineArgs, plan, tokenizer: Any) -> None:
        """Our side of the model: tokenizer, vocabulary, EOS ids, context length, sampling defaults."""
        hf = plan.artifact.hf_config
        self.model_config = hf
        self.tokenizer = _load_tokenizer(args, plan.artifact.model_dir, tokenizer)
        self.vocab_size = int(hf.get("vocab_size") or len(self.tokenizer))
        eos = hf.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.max_model_len = plan.max_model_len or int(hf.get("max_position_embeddings") or 2048)
        gen = _generation_config(plan.artifact.model_dir)
        self.default_sampling_kwargs = generation_defaults(gen)

    # ---- sampling defaults --------------------------------------------------------------------
    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.default_sampling_kwargs)

    def get_diff_sampling_param(self) -> dict[str, Any]:
        return dict(self.default_sampling_kwargs)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Start a request on the vendor engine. ``ValueError`` for bad input or a knob it does not honour."""
        if self._closed:
            raise RuntimeError("the engine is shut down (shutdown() was called); create a new one to serve requests")
        if isinstance(params, PoolingParams):
            raise ValueError("params=PoolingParams(...): pooling on RNGD is not supported by this backend yet; "
                             "pass a SamplingParams")
        text, params, req = self.input_processor.process(request_id, prompt, params, arrival_time)
        check_sampling(params)
        ids = list(req.prompt_token_ids)
        native_params = NativeSamplingParams(
            max_tokens=req.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            min_p=params.min_p, repetition_penalty=params.repetition_penalty, ignore_eos=params.ignore_eos,
            stop_token_ids=list(params.stop_token_ids or ()), min_tokens=params.min_tokens, logprobs=params.logprobs,
        )
        metrics = RequestMetrics(arrival_time=req.arrival_time)
        with self._lock:
            if request_id in self.output_processor.states:
                raise ValueError(f"request_id={request_id!r}: a live request already has this id")
            self.output_processor.add(request_id, text, ids, params, metrics)
            self._first.add(request_id)
            self._counts["prompt"] += len(ids)
            try:
                self.runner.start(request_id, NativeEncoding(ids, [1] * len(ids)), native_params)
            except BaseException:
                self.output_processor.states.pop(request_id, None)
                self._first.discard(request_id)
                raise

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        """End live requests now (the vendor engine frees their KV blocks); their final outputs."""
        outs = []
        with self._lock:
            for rid in [request_id] if isinstance(request_id, str) else list(request_id):
                if rid in self.output_processor.states:
                    self.runner.abort(rid)
                    self._first.discard(rid)
                    out = self.output_processor.abort(rid)
                    if out is not None:
                        outs.append(out)
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.states)

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.states)

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """What the vendor engine produced since the last call (waits up to ``POLL_S`` for something).

        A request whose stream failed ends with finish reason "error"; ``EngineDeadError`` once the
        vendor engine reports ``is_alive() == False`` (every live request ends with "error" first).
        """
        if self._dead is not None:
            raise self._dead
        deltas = self.runner.poll(POLL_S)
        if not deltas and not self.runner.is_alive():
            with self._lock:
                return self._die()
        with self._lock:
            return self._fold(deltas)

    def _fold(self, deltas) -> list[RequestOutput]:
        """The native deltas as ``RequestOutput``s (under ``_lock``); stop-string matches are aborted natively."""
        now = time.monotonic()
        core_outputs = []
        for d in deltas:
            st = self.output_processor.states.get(d.request_id)
            if st is None:
                continue  # aborted, or drained after a stop string
            m = st.metrics
            first = d.request_id in self._first
            if first:
                self._first.discard(d.request_id)
                m.first_scheduled_time = m.first_scheduled_time or d.at
                self._counts["cached"] += d.num_cached_tokens or 0
            if d.new_token_ids:
                if self.token_log is not None:
                    self.token_log.append((d.request_id, len(d.new_token_ids), d.at))
                m.first_token_time = m.first_token_time or d.at
                m.last_token_time = d.at
                self._counts["generated"] += len(d.new_token_ids)
            if d.finish_reason is not None:
                m.finished_time = d.at
            stop_reason = None
            if d.finish_reason == "stop" and d.new_token_ids and d.new_token_ids[-1] not in self.eos_token_ids:
                stop_reason = d.new_token_ids[-1]  # a stop token id (vLLM's stop_reason)
            if d.logprobs and len(d.new_token_ids) > 1:  # one core output per token, so each keeps its logprobs
                for tok, lp in zip(d.new_token_ids[:-1], d.logprobs[:-1]):
                    core_outputs.append(CoreOutput(d.request_id, [tok], logprobs=lp,
                                                   num_cached_tokens=d.num_cached_tokens if first else None,
                                                   metrics=m if first else None))
                    first = False
                d.new_token_ids, d.logprobs = d.new_token_ids[-1:], d.logprobs[-1:]
            core_outputs.append(CoreOutput(d.request_id, d.new_token_ids, d.finish_reason, stop_reason,
                                           logprobs=d.logprobs[-1] if d.logprobs else None,
                                           num_cached_tokens=d.num_cached_tokens if first else None,
                                           metrics=m if first else None, error=d.error))
        self._counts["steps"] += 1 if deltas else 0
        processed = self.output_processor.process(core_outputs)
        for rid, _stop in processed.stopped:  # a stop string matched: abort natively, drop what is still coming
            self.runner.abort(rid)
        for rid in processed.failed:
            self.runner.abort(rid)
        for out in processed.request_outputs:
            if out.finished and out.metrics is not None and out.metrics.finished_time is None:
                out.metrics.finished_time = now
        return processed.request_outputs

    def _die(self) -> list[RequestOutput]:
        outs = [o for rid in list(self.output_processor.states)
                if (o := self.output_processor.abort(rid, "error", "the RNGD engine died (is_alive() is False)"))]
        self._dead = EngineDeadError("the vendor RNGD engine is no longer alive (NativeLLMEngine.is_alive() is False)")
        if outs:
            return outs
        raise self._dead

    # ---- state --------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Requests live on our side and token counters; KV figures are the vendor's (see ``metrics_text``): 0 here."""
        n = len(self.output_processor.states)
        waiting = len(self._first)
        return EngineStats(num_running=n - waiting, num_waiting=waiting, num_kv_blocks_used=0, num_kv_blocks_total=0,
                           num_steps=self._counts["steps"], num_preemptions=0,
                           num_prompt_tokens_computed=self._counts["prompt"] - self._counts["cached"],
                           num_cached_tokens=self._counts["cached"], num_generated_tokens=self._counts["generated"],
                           num_prefix_cache_queries=self._counts["prompt"])

    def metrics_text(self) -> str:
        """The vendor engine's own Prometheus metrics."""
        return self.runner.metrics_text()

    def is_alive(self) -> bool:
        return not self._closed and self._dead is None and self.runner.is_alive()

    def shutdown(self) -> None:
        """Abort every live request and shut the vendor engine down; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for rid in list(self.output_processor.states):
                self.runner.abort(rid)
            self.output_processor.states.clear()
        self.runner.shutdown()

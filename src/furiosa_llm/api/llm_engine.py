"""LLMEngine: the synchronous engine. Tokenizes, validates, drives EngineCore, builds outputs."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from furiosa_llm.core import EngineCore, EngineStats, JitConfig, JitPolicy, Request, Scheduler, SchedulerConfig
from furiosa_llm.core.scheduler import CoreOutput
from furiosa_llm.hal import Device, ExecutionQueue, TokenLogprob

from .detokenizer import IncrementalDetokenizer
from .engine_args import EngineArgs
from .inputs import PromptType, parse_prompt
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("furiosa_llm")


class PromptTooLongError(ValueError):
    """A prompt plus its output cannot fit the context (``max_model_len``)."""


@dataclass
class _Tracked:
    """What the API layer keeps for a live request beside the core's ``Request``."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    cumulative_logprob: float | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    num_cached_tokens: int = 0


def _select_devices(args: EngineArgs) -> list[Device]:
    from furiosa_llm.hal.discovery import check_available, default_devices

    devices = args.parsed_devices() or default_devices()
    check_available(devices)
    if any(d.kind == "npu" for d in devices):
        raise ValueError(
            f"devices={args.devices or ','.join(map(str, devices))!r}: RNGD NPUs need the driver backend, which this "
            "build does not include; use --devices cpu or cuda:N (or the simulator)"
        )
    pp = args.pipeline_parallel_size or 1
    dp = args.data_parallel_size or 1
    if pp * dp > len(devices):
        raise ValueError(
            f"pipeline_parallel_size={pp} x data_parallel_size={dp} requires {pp * dp} devices; "
            f"{len(devices)} available ({','.join(map(str, devices))})"
        )
    if pp > 1 or dp > 1 or len(devices) > 1:
        raise ValueError(
            f"devices={','.join(map(str, devices))!r}: the torch backend runs one replica on one device "
            "(pipeline_parallel_size=1, data_parallel_size=1); pass a single device"
        )
    return devices


def _kv_budget_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.8)
    avail = 8 * 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(min(2 * 2**30, avail * 0.25))


class LLMEngine:
    def __init__(self, args: EngineArgs, *, queue: ExecutionQueue | None = None) -> None:
        import torch

        from furiosa_llm.hal import ThreadedQueue
        from furiosa_llm.model.loader import load_model_and_tokenizer, resolve_model
        from furiosa_llm.model.runner import ModelRunner, kv_bytes_per_block

        self.args = args
        devices = _select_devices(args)
        device = devices[0].torch_device
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
        if dtype is None:  # auto
            dtype = torch.float32 if device == "cpu" else torch.bfloat16
        src = resolve_model(args.model, args.revision)
        hf_model, tokenizer, secs = load_model_and_tokenizer(
            src, cache_dir=args.cache_dir, tokenizer=args.tokenizer, tokenizer_mode=args.tokenizer_mode,
            revision=args.revision, dtype=dtype,
        )
        self.load_seconds = secs
        logger.info("loaded %s in %.1fs on %s", args.model, secs, device)
        cfg = hf_model.config
        self.model_config = cfg
        self.tokenizer = tokenizer
        self.vocab_size = cfg.vocab_size
        per_block = kv_bytes_per_block(cfg, args.block_size, dtype)
        if args.num_kv_blocks is not None:
            num_blocks = args.num_kv_blocks
        else:
            budget = args.kv_cache_memory_bytes or _kv_budget_bytes(device)
            num_blocks = budget // per_block
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory_bytes={budget}: less than one KV block ({per_block} bytes)")
        model_max = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_model_len = min(args.max_model_len or model_max, model_max, num_blocks * args.block_size)
        eos = set()
        for src_ids in (getattr(hf_model.generation_config, "eos_token_id", None), cfg.eos_token_id, tokenizer.eos_token_id):
            if isinstance(src_ids, int):
                eos.add(src_ids)
            elif src_ids:
                eos.update(src_ids)
        self.eos_token_ids = frozenset(eos)
        self.runner = ModelRunner(hf_model, device, num_blocks, args.block_size, seed=args.seed)
        self.queue = queue or ThreadedQueue(self.runner, args.resolved_npu_queue_limit, clock=time.monotonic,
                                            compile_workers=args.jit_max_workers)
        jit = None
        if args.enable_jit_compilation:
            jit = JitPolicy(JitConfig(True, args.jit_threshold, args.jit_max_workers, args.jit_unit_size),
                            num_layers=cfg.num_hidden_layers)
            logger.info("JIT on: decode buckets compile after %d hits, %d at once, %d layers per unit (backend %s)",
                        args.jit_threshold, args.jit_max_workers, args.jit_unit_size, self.runner.jit_backend)
        sched = Scheduler(
            SchedulerConfig(
                num_blocks=num_blocks,
                block_size=args.block_size,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_processing_samples=args.resolved_max_processing_samples,
                spare_blocks_ratio=args.resolved_spare_blocks_ratio,
                max_model_len=self.max_model_len,
                enable_prefix_caching=args.enable_prefix_caching,
            ),
            eos_token_ids=self.eos_token_ids,
        )
        self.core = EngineCore(sched, self.queue, time.monotonic, jit=jit)
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.RLock()
        logger.info(
            "engine ready: %d KV blocks x %d tokens, max_model_len=%d, npu_queue_limit=%d",
            num_blocks, args.block_size, self.max_model_len, self.queue.limit,
        )

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    def get_tokenizer(self):
        return self.tokenizer

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        if not isinstance(request_id, str):
            raise ValueError(f"request_id={request_id!r}: must be a str")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params={params!r:.80}: expected a SamplingParams")
        text, ids = parse_prompt(prompt, self.tokenizer, self.vocab_size)
        need = len(ids) + max(params.max_tokens or 1, params.min_tokens, 1)
        if need > self.max_model_len:
            raise PromptTooLongError(
                f"prompt: {len(ids)} prompt tokens + max(max_tokens={params.max_tokens}, min_tokens={params.min_tokens}, 1) "
                f"= {need} exceeds max_model_len={self.max_model_len}"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        now = time.monotonic() if arrival_time is None else arrival_time
        req = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            max_tokens=max_tokens,
            arrival_time=now,
            sampling=params.settings(),
            min_tokens=params.min_tokens,
            stop_token_ids=frozenset(params.stop_token_ids or ()),
            ignore_eos=params.ignore_eos,
        )
        tracked = _Tracked(
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            detok=IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                                         stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output),
            metrics=RequestMetrics(arrival_time=now),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
            prompt_logprobs=[] if params.prompt_logprobs is not None else None,
        )
        with self._lock:
            self.core.add_request(req)  # raises on a duplicate live id
            self._tracked[request_id] = tracked

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        """Abort live requests, freeing their KV blocks now; returns their final outputs."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        outs = []
        with self._lock:
            for rid in ids:
                if self.core.abort(rid) is None:
                    continue
                t = self._tracked.pop(rid)
                t.metrics.finished_time = time.monotonic()
                outs.append(self._output(rid, t, finish_reason="abort", stop_reason=None, force=True))
        return outs

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return self.core.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return self.core.num_unfinished

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        with self._lock:
            return self._process(core_outputs)

    def _process(self, core_outputs: list[CoreOutput]) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        now = time.monotonic()
        for co in core_outputs:
            t = self._tracked.get(co.request_id)
            if t is None:
                continue
            if co.prompt_logprobs is not None and t.prompt_logprobs is not None:
                if len(t.prompt_logprobs) < len(t.prompt_token_ids):  # not again after a preemption
                    t.prompt_logprobs += [self._convert(e) for e in co.prompt_logprobs]
            finish, stop_reason = co.finish_reason, co.stop_reason
            for i, tok in enumerate(co.new_token_ids):
                t.token_ids.append(tok)
                if co.logprobs is not None and t.logprobs is not None:
                    entry = self._convert(co.logprobs)
                    t.logprobs.append(entry)
                    t.cumulative_logprob += entry[tok].logprob
                hit = t.detok.add(tok)
                if hit is not None and finish is None and len(t.token_ids) >= t.params.min_tokens:
                    self.core.stop(co.request_id, hit)
                    finish, stop_reason = "stop", hit
            if not co.new_token_ids:
                continue
            if t.metrics.first_token_time is None:
                t.metrics.first_token_time = now
            t.metrics.last_token_time = now
            if finish is not None:
                t.metrics.finished_time = now
                del self._tracked[co.request_id]
            out = self._output(co.request_id, t, finish, stop_reason)
            if out is not None:
                outs.append(out)
        return outs

    def _convert(self, entries: list[TokenLogprob] | None) -> dict[int, Logprob] | None:
        if entries is None:
            return None
        d: dict[int, Logprob] = {}
        for e in entries:
            if e.token_id not in d:
                d[e.token_id] = Logprob(e.logprob, e.rank, self.tokenizer.decode([e.token_id]))
        return d

    def _output(self, rid: str, t: _Tracked, finish_reason: str | None, stop_reason, force: bool = False) -> RequestOutput | None:
        finished = finish_reason is not None
        kind = t.params.output_kind
        if kind is RequestOutputKind.FINAL and not finished:
            return None
        text = t.detok.visible_text(finished)
        token_ids, logprobs = t.token_ids, t.logprobs
        if kind is RequestOutputKind.DELTA:
            text, token_ids = text[t.sent_text :], token_ids[t.sent_tokens :]
            logprobs = None if logprobs is None else logprobs[t.sent_tokens :]
            if not text and not token_ids and not finished and not force:
                return None
        t.sent_text = len(t.detok.visible_text(finished))
        t.sent_tokens = len(t.token_ids)
        comp = CompletionOutput(
            index=0, text=text, token_ids=list(token_ids), cumulative_logprob=t.cumulative_logprob,
            logprobs=None if logprobs is None else list(logprobs), finish_reason=finish_reason, stop_reason=stop_reason,
        )
        return RequestOutput(
            request_id=rid, prompt=t.prompt, prompt_token_ids=t.prompt_token_ids, prompt_logprobs=t.prompt_logprobs,
            outputs=[comp], finished=finished, metrics=t.metrics, num_cached_tokens=t.num_cached_tokens,
        )

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
        with self._lock:
            for rid in list(self._tracked):
                self.core.abort(rid)
            self._tracked.clear()
        self.queue.close()

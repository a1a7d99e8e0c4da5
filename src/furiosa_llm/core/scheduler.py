"""The scheduler: continuous batching, chunked prefill under a token budget, FCFS, preemption.

``schedule(now) -> Batch | None`` decides what runs next; ``update(result, now)`` folds a
step's sampled tokens back into the requests. It sees block ids and token counts, never
tensors. Deterministic given the arrivals, the results and the clock.

One rule covers prefill and decode: a request computes ``num_tokens - num_computed_tokens``
tokens (the whole prompt, a chunk of it, or the one token sampled last step) and samples a
new token when a step brings it to ``num_tokens``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from furiosa_llm.hal import Batch, SequenceChunk, StepResult

from .block_allocator import BlockAllocator
from .request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_processing_samples: int = 65536
    spare_blocks_ratio: float = 0.0
    max_model_len: int = 8192
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens}: must be >= 1")
        if self.max_processing_samples < 1:
            raise ValueError(f"max_processing_samples={self.max_processing_samples}: must be > 0")
        if not 0.0 <= self.spare_blocks_ratio < 1.0:
            raise ValueError(f"spare_blocks_ratio={self.spare_blocks_ratio}: must be in [0, 1)")


@dataclass(slots=True)
class CoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list | None = None
    prompt_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_prompt_tokens_computed: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0
    trace: list[tuple[int, tuple[tuple[str, int], ...]]] | None = field(default=None)


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_token_ids: frozenset[int] = frozenset(), record_trace: bool = False):
        self.config = config
        self.allocator = BlockAllocator(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.in_flight: dict[int, Batch] = {}
        self.stats = SchedulerStats(trace=[] if record_trace else None)
        self._next_step = 0

    # ---- requests --------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id={request.request_id!r}: a live request already has this id")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None, now: float | None = None) -> Request | None:
        """End a live request (abort, or a stop string found above the core) and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.allocator.free(req.block_ids)
        req.block_ids = []
        req.status = status
        req.stop_reason = stop_reason
        req.in_flight = False
        req.finished_time = now
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.in_flight)

    # ---- scheduling --------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.allocator.free(req.block_ids)
        req.block_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_hashed_blocks = 0
        req.last_block_hash = None
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(req)

    def _victim(self) -> Request | None:
        for r in reversed(self.running):
            if not r.in_flight:
                return r
        return None

    def _chunk(self, req: Request, n: int) -> SequenceChunk:
        """The next ``n`` tokens of ``req`` for this step; the request is in flight until its result is in."""
        start = req.num_computed_tokens
        s = req.sampling
        history = req.needs_history
        req.in_flight = True
        return SequenceChunk(
            req.request_id,
            req.token_ids[start : start + n],
            start,
            req.block_ids,  # not grown while in flight; replaced by a new list when freed
            start + n == len(req.token_ids),
            s,
            len(req.output_token_ids),
            req.prompt_token_ids if history or s.prompt_logprobs is not None else (),
            req.output_token_ids.copy() if history else (),
            req,
        )

    def schedule(self, now: float) -> Batch | None:
        cfg = self.config
        alloc = self.allocator
        budget = cfg.max_num_batched_tokens
        seqs: list[SequenceChunk] = []
        preempted = False

        # 1. running requests, oldest first: decode tokens and unfinished prefill chunks. A victim
        #    of preemption is always newer than the request being grown, so never already chunked.
        bs = alloc.block_size
        for req in list(self.running):
            if budget == 0:
                break
            if req.in_flight or req.status is not RequestStatus.RUNNING:
                continue
            n = min(len(req.token_ids) - req.num_computed_tokens, budget)
            if len(req.block_ids) * bs < req.num_computed_tokens + n:  # needs another block
                while not alloc.allocate(req.block_ids, req.num_computed_tokens + n):
                    victim = self._victim()
                    assert victim is not None  # req itself is not in flight
                    self._preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                if req.status is not RequestStatus.RUNNING:
                    continue
            seqs.append(self._chunk(req, n))
            budget -= n

        # 2. waiting requests, FCFS; none after a preemption this step
        while self.waiting and budget > 0 and not preempted and len(self.running) < cfg.max_processing_samples:
            req = self.waiting[0]
            cached = alloc.cached_prefix(req.token_ids)
            cost = alloc.cost_of([], req.num_tokens, cached)
            spare = cfg.spare_blocks_ratio * alloc.num_blocks
            if self.running and alloc.num_free - cost < spare:
                break  # keep spare blocks for the running requests to grow into
            if not alloc.allocate(req.block_ids, req.num_tokens, cached):
                break
            self.waiting.popleft()
            req.num_computed_tokens = len(cached) * alloc.block_size
            req.num_hashed_blocks, req.last_block_hash = alloc.cache_full_blocks(
                req.block_ids, req.token_ids, req.num_computed_tokens, 0, None
            )
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
                req.num_cached_tokens = req.num_computed_tokens
                self.stats.num_cached_tokens += req.num_computed_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            seqs.append(self._chunk(req, n))
            budget -= n

        if not seqs:
            return None
        step_id = self._next_step
        self._next_step += 1
        batch = Batch(step_id, seqs)
        self.in_flight[step_id] = batch
        self.stats.num_steps += 1
        if self.stats.trace is not None:
            self.stats.trace.append((step_id, tuple((c.request_id, len(c.token_ids)) for c in seqs)))
        return batch

    # ---- results -----------------------------------------------------------------------------
    def update(self, result: StepResult, now: float) -> list[CoreOutput]:
        batch = self.in_flight.pop(result.step_id)
        outputs: list[CoreOutput] = []
        alloc = self.allocator
        bs = alloc.block_size
        hashing = alloc.enable_prefix_caching
        sampled, logprobs, prompt_lps = result.sampled, result.logprobs, result.prompt_logprobs
        num_generated = 0
        for chunk in batch.sequences:
            req = chunk.owner
            if not req.in_flight:
                continue  # aborted or finished while in flight (finish clears in_flight): its result is dropped
            req.in_flight = False
            n = len(chunk.token_ids)
            if chunk.start_pos < len(req.prompt_token_ids):
                self.stats.num_prompt_tokens_computed += min(n, len(req.prompt_token_ids) - chunk.start_pos)
            req.num_computed_tokens += n
            if hashing and (req.num_hashed_blocks + 1) * bs <= req.num_computed_tokens:  # a block became full
                req.num_hashed_blocks, req.last_block_hash = alloc.cache_full_blocks(
                    req.block_ids, req.token_ids, req.num_computed_tokens, req.num_hashed_blocks, req.last_block_hash
                )
            rid = req.request_id
            prompt_lp = prompt_lps.get(rid) if prompt_lps else None
            if not chunk.sample:
                if prompt_lp is not None:
                    outputs.append(CoreOutput(rid, [], prompt_logprobs=prompt_lp))
                continue
            tok = sampled[rid]
            req.append_output(tok)
            num_generated += 1
            if req.first_token_time is None:
                req.first_token_time = now
            out = CoreOutput(rid, [tok], None, None, logprobs.get(rid) if logprobs else None, prompt_lp)
            status, stop_reason = self._check_stop(req, tok)
            if status is not None:
                self.finish(rid, status, stop_reason, now)
                out.finish_reason = status.finish_reason
                out.stop_reason = stop_reason
            outputs.append(out)
        self.stats.num_generated_tokens += num_generated
        return outputs

    def _check_stop(self, req: Request, tok: int) -> tuple[RequestStatus | None, int | None]:
        num_out = len(req.output_token_ids)
        if num_out >= req.min_tokens:
            if not req.ignore_eos and tok in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if tok in req.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, tok
        if num_out >= req.max_tokens or len(req.token_ids) >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

"""The scheduler: continuous batching, chunked prefill under a token budget, FCFS, preemption.

``schedule(now) -> Batch | None`` decides what runs next; ``update(result, now)`` folds a
step's sampled tokens back into the requests. It sees block ids and token counts, never
tensors. Deterministic given the arrivals, the results and the clock.

One rule covers prefill and decode: a request computes ``num_tokens - num_computed_tokens``
tokens (the whole prompt, a chunk of it, or the one token sampled last step) and samples a
new token when a step brings it to ``num_tokens``. Block tables change only through the
allocator's verbs: ``admit`` (first blocks, with the cached prefix), ``grow``, ``commit``
(hash blocks that became full) and ``free``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from furiosa_llm.hal import Batch, SequenceChunk, StepResult

from .block_allocator import BlockAllocator
from .config import SchedulerConfig
from .metrics import RequestMetrics, SchedulerStats
from .request import Request, RequestStatus


@dataclass(slots=True)
class CoreOutput:
    """What one step produced for one request.

    The request's first output also carries ``num_cached_tokens`` (prompt tokens served from
    the prefix cache) and ``metrics``, the request's timing record (kept up to date by the core).
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    num_cached_tokens: int | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None  # why the request failed (finish_reason "error")
    pooled: list[float] | None = None  # a pooling request's vector (its one output, finish_reason "stop")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_token_ids: frozenset[int] = frozenset(), record_trace: bool = False):
        self.config = config
        self.allocator = BlockAllocator(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.in_flight: dict[int, Batch] = {}  # batches submitted, results not folded in yet
        self.stats = SchedulerStats()
        # the decision trace: (step id, ((request id, tokens computed), ...)) per batch, when recorded
        self.trace: list[tuple[int, tuple[tuple[str, int], ...]]] | None = [] if record_trace else None
        self._next_step = 0
        self._next_slot = 0  # the batch slot the next batch serves first (num_batch_slots > 1)
        self.slot_sizes = [0] * config.num_batch_slots  # running requests per slot

    # ---- requests --------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id={request.request_id!r}: a live request already has this id")
        if request.pooling and request.num_tokens > self.config.max_num_batched_tokens:
            raise ValueError(
                f"prompt: {request.num_tokens} tokens; a pooling prompt runs whole in one step and may not exceed "
                f"max_num_batched_tokens={self.config.max_num_batched_tokens}"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None,
                       now: float | None = None) -> Request | None:
        """End a live request with ``status`` and free its blocks; an unknown id returns None.

        A batch in flight may still hold the request; its result for it is dropped on ``update``.
        """
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.slot_sizes[req.slot] -= 1
        else:
            self.waiting.remove(req)
        self.allocator.free(req.block_table)
        req.status = status
        req.stop_reason = stop_reason
        req.in_batch = False
        req.metrics.finished_time = now
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.in_flight)

    # ---- scheduling --------------------------------------------------------------------------
    def schedule(self, now: float) -> Batch | None:
        """The next batch: running requests first (phase 1), then waiting ones (phase 2); None when idle.

        With several batch slots, the batch serves the first slot, in turn from the one after the
        last served, that has no batch in flight and has work. A slot has one batch in flight at a
        time (vLLM's virtual engines), one slot included, so a queue deeper than the slots changes
        nothing: a second batch beside a slot's would hold the requests the first does not, and
        they would go on decoding apart in batches of their own, each reading the weights again.
        """
        n = self.config.num_batch_slots
        # the slots with a batch in flight (a batch serves one slot: that of its requests)
        busy = {b.sequences[0].owner.slot for b in self.in_flight.values()}
        for k in range(n):
            slot = (self._next_slot + k) % n
            if slot in busy:
                continue
            seqs = self._schedule_slot(slot if n > 1 else None, now)
            if seqs:
                self._next_slot = (slot + 1) % n
                break
        else:
            return None
        step_id = self._next_step
        self._next_step += 1
        batch = Batch(step_id=step_id, sequences=seqs)
        self.in_flight[step_id] = batch
        self.stats.num_steps += 1
        if self.trace is not None:
            self.trace.append((step_id, tuple((c.request_id, len(c.token_ids)) for c in seqs)))
        return batch

    def _schedule_slot(self, slot: int | None, now: float) -> list[SequenceChunk]:
        """The chunks of one batch for ``slot`` (None: the one slot, every running request)."""
        budget = self.config.max_num_batched_tokens
        seqs: list[SequenceChunk] = []
        budget, preempted = self._schedule_running(seqs, budget, slot)
        if not preempted:  # a preemption this step means memory is short: admit nothing new
            budget = self._schedule_waiting(seqs, budget, now, slot)
        assert 0 <= budget <= self.config.max_num_batched_tokens
        assert len(self.running) <= self.config.max_processing_samples * self.config.num_batch_slots
        assert len(seqs) <= self.config.max_processing_samples
        return seqs

    def _schedule_running(self, seqs: list[SequenceChunk], budget: int, slot: int | None) -> tuple[int, bool]:
        """Decode tokens and unfinished prefill chunks of running requests, oldest first.

        A request that needs another block preempts the newest running request not in a batch
        (possibly itself). A victim is always newer than the request being grown, so it was not
        chunked this step. Returns the budget left and whether anything was preempted.
        """
        alloc = self.allocator
        room = alloc.block_size
        preempted = False
        running = RequestStatus.RUNNING
        append = seqs.append
        for req in list(self.running) if slot is None else [r for r in self.running if r.slot == slot]:
            if budget == 0:
                break
            if req.in_batch or req.status is not running:
                continue
            computed = req.num_computed_tokens
            tokens = req.token_ids
            total = len(tokens)
            n = total - computed
            if n > budget:
                n = budget
            need = computed + n
            table = req.block_table
            if len(table.ids) * room < need:
                while not alloc.grow(table, need):
                    victim = self._victim()
                    assert victim is not None  # req itself is not in a batch
                    self._preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                if req.status is not running:
                    continue
            if req.pooling or req.needs_history or req.sampling.prompt_logprobs is not None:
                append(self._chunk(req, n))
            else:  # the hot path, _chunk's last case inlined (one chunk per running request per step)
                req.in_batch = True
                append(SequenceChunk(req.request_id, tokens[computed:need], computed, table.ids, need == total,
                                     req.sampling, len(req.output_token_ids), (), (), req))
            budget -= n
        return budget, preempted

    def _schedule_waiting(self, seqs: list[SequenceChunk], budget: int, now: float, slot: int | None) -> int:
        """Admit waiting requests in arrival order (FCFS) while the budget, the running cap and the blocks allow.

        Unless the running set is empty, admission keeps ``spare_blocks_ratio`` of the blocks free.
        An admitted request joins ``slot``; ``max_processing_samples`` caps each slot (so each batch),
        which with one slot is the whole running set. With several slots a slot also takes no more
        than its fair share of the live requests, ``ceil((running + waiting) / slots)``: when one
        step's budget could admit every waiting request, they still spread over the slots, so each
        batch in flight (each pipeline stage) has work.
        """
        cfg, alloc = self.config, self.allocator
        spare = cfg.spare_blocks_ratio * alloc.num_blocks
        k = slot or 0
        cap = cfg.max_processing_samples
        if cfg.num_batch_slots > 1:
            cap = min(cap, -(-(len(self.running) + len(self.waiting)) // cfg.num_batch_slots))
        while self.waiting and budget > 0 and self.slot_sizes[k] < cap:
            req = self.waiting[0]
            if req.pooling and req.num_tokens > budget:
                break  # a pooling prompt is never chunked: it waits (FCFS) for a step with room for all of it
            # prompt logprobs need the logits of every prompt position, and a pooling request every hidden
            # state: such a prompt is computed whole
            cached = (alloc.cached_prefix(req.token_ids, req.block_hashes)
                      if req.sampling.prompt_logprobs is None and not req.pooling else [])
            if self.running and alloc.num_free - alloc.cost_of((), req.num_tokens, cached) < spare:
                break  # keep spare blocks for the running requests to grow into
            if not alloc.admit(req.block_table, req.token_ids, cached, req.block_hashes):
                break
            self.waiting.popleft()
            req.num_computed_tokens = len(cached) * alloc.block_size
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.num_cached_tokens = req.num_computed_tokens
                self.stats.num_cached_tokens += req.num_computed_tokens
                if alloc.enable_prefix_caching and req.sampling.prompt_logprobs is None and not req.pooling:
                    self.stats.num_prefix_cache_queries += req.num_tokens
            req.status = RequestStatus.RUNNING
            req.slot = k
            self.slot_sizes[k] += 1
            self.running.append(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            seqs.append(self._chunk(req, n))
            budget -= n
        return budget

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.slot_sizes[req.slot] -= 1
        self.allocator.free(req.block_table)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(req)

    def _victim(self) -> Request | None:
        for r in reversed(self.running):
            if not r.in_batch:
                return r
        return None

    def _chunk(self, req: Request, n: int) -> SequenceChunk:
        """The next ``n`` tokens of ``req`` for this step; the request is in a batch until its result is in."""
        start = req.num_computed_tokens
        end = start + n
        req.in_batch = True
        if req.pooling:
            return SequenceChunk(request_id=req.request_id, token_ids=req.token_ids[start:end], start_pos=start,
                                 block_table=req.block_table.ids, sample=False, sampling=req.sampling, owner=req,
                                 pool=True)
        if req.needs_history or req.sampling.prompt_logprobs is not None:  # the backend reads earlier tokens
            history = req.needs_history
            return SequenceChunk(
                request_id=req.request_id, token_ids=req.token_ids[start:end], start_pos=start,
                block_table=req.block_table.ids, sample=end == len(req.token_ids), sampling=req.sampling,
                num_output_tokens=len(req.output_token_ids), prompt_token_ids=req.prompt_token_ids,
                output_token_ids=req.output_token_ids.copy() if history else (), owner=req,
            )
        # the hot path (one chunk per running request per step): positional, in SequenceChunk's field order
        # (request_id, token_ids, start_pos, block_table, sample, sampling, num_output_tokens); the block
        # table list is not grown while in a batch and is replaced by a new list when freed
        return SequenceChunk(req.request_id, req.token_ids[start:end], start, req.block_table.ids,
                             end == len(req.token_ids), req.sampling, len(req.output_token_ids), owner=req)

    # ---- results -----------------------------------------------------------------------------
    def update(self, result: StepResult, now: float) -> list[CoreOutput]:
        """Fold a step's result into its requests; returns one output per request that has news."""
        batch = self.in_flight.pop(result.step_id)
        outputs: list[CoreOutput] = []
        alloc = self.allocator
        hashing, bs = alloc.enable_prefix_caching, alloc.block_size
        sampled, logprobs, prompt_lps, errors = result.sampled, result.logprobs, result.prompt_logprobs, result.errors
        eos, max_model_len = self.eos_token_ids, self.config.max_model_len
        num_generated = num_prompt_computed = 0
        append = outputs.append
        for chunk in batch.sequences:
            req = chunk.owner
            if not req.in_batch:
                continue  # ended while in flight (finish_request clears in_batch): its result is dropped
            req.in_batch = False
            n = len(chunk.token_ids)
            start, num_prompt = chunk.start_pos, len(req.prompt_token_ids)
            if start < num_prompt:
                num_prompt_computed += n if n < num_prompt - start else num_prompt - start
            computed = req.num_computed_tokens = req.num_computed_tokens + n
            if req.pooling:  # its one step: the pooled vector, and the request ends, freeing its blocks
                rid = req.request_id
                m = req.metrics
                m.first_token_time = m.last_token_time = now
                self.finish_request(rid, RequestStatus.FINISHED_STOPPED, None, now)
                append(self._first_output(req, CoreOutput(rid, [], finish_reason="stop", pooled=result.pooled.get(rid))))
                continue
            if errors and req.request_id in errors:  # its step failed: it ends, its blocks freed (this step's not cached)
                rid = req.request_id
                self.finish_request(rid, RequestStatus.FINISHED_ERROR, now=now)
                append(self._first_output(req, CoreOutput(rid, [], finish_reason="error", error=errors[rid])))
                continue
            tokens = req.token_ids
            if hashing and (req.block_table.num_hashed + 1) * bs <= computed:  # a block became full
                alloc.commit(req.block_table, tokens, computed, req.block_hashes)
            rid = req.request_id
            prompt_lp = prompt_lps.get(rid) if prompt_lps else None
            if not chunk.sample:
                if prompt_lp is not None:
                    append(self._first_output(req, CoreOutput(request_id=rid, new_token_ids=[], prompt_logprobs=prompt_lp)))
                continue
            tok = sampled[rid]
            output_ids = req.output_token_ids
            output_ids.append(tok)
            tokens.append(tok)
            num_generated += 1
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            out = CoreOutput(rid, [tok])
            if logprobs or prompt_lp is not None:
                out.logprobs = logprobs.get(rid) if logprobs else None
                out.prompt_logprobs = prompt_lp
            if (len(output_ids) < req.max_tokens and len(tokens) < max_model_len
                    and tok not in eos and tok not in req.stop_token_ids):
                # the common case, decided without a call: the request goes on
                append(out if req.reported else self._first_output(req, out))
                continue
            status, stop_reason = self._check_stop(req, tok)
            if status is not None:
                self.finish_request(rid, status, stop_reason, now)
                out.finish_reason = status.finish_reason
                out.stop_reason = stop_reason
            append(out if req.reported else self._first_output(req, out))
        stats = self.stats
        stats.num_prompt_tokens_computed += num_prompt_computed
        stats.num_generated_tokens += num_generated
        return outputs

    def fail_batch(self, step_id: int, error: str, now: float) -> list[CoreOutput]:
        """End every request of the in-flight batch ``step_id`` with finish reason "error" and free its blocks.

        The batch leaves the in-flight map; requests that already ended are left alone.
        """
        batch = self.in_flight.pop(step_id)
        outputs = []
        for chunk in batch.sequences:
            req = chunk.owner
            if req.in_batch and self.finish_request(req.request_id, RequestStatus.FINISHED_ERROR, now=now) is not None:
                outputs.append(self._first_output(req, CoreOutput(request_id=req.request_id, new_token_ids=[],
                                                                  finish_reason="error", error=error)))
        return outputs

    @staticmethod
    def _first_output(req: Request, out: CoreOutput) -> CoreOutput:
        """``out``, carrying the request's timing record and cached-token count if it is the request's first."""
        if not req.reported:
            req.reported = True
            out.num_cached_tokens = req.num_cached_tokens
            out.metrics = req.metrics
        return out

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

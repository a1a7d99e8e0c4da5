"""Measurements as data: a request's timing record, the latency formulas, engine snapshots.

Times are seconds of the core's injected clock (the wall clock on torch, ``env.now`` in the
simulator). The formulas are the ones of vLLM's serving benchmark and metrics: TTFT from
arrival to the first token, TPOT over the tokens after the first, ITL between consecutive
tokens, E2E latency from arrival to the last token. They work on floats and on numpy arrays
alike, so the server's histograms and the simulator's reports compute them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from .jit import JitStats


def time_to_first_token(arrival_time, first_token_time):
    """Seconds from arrival to the first output token."""
    return first_token_time - arrival_time


def time_per_output_token(first_token_time, last_token_time, num_output_tokens):
    """Mean seconds per output token after the first: ``(last - first) / (n - 1)``; 0 where ``n <= 1``."""
    n1 = num_output_tokens - 1
    return (last_token_time - first_token_time) * (n1 > 0) / (n1 * (n1 > 0) + (n1 <= 0))  # n = 0: a pooling request


def e2e_latency(arrival_time, last_token_time):
    """Seconds from arrival to the last output token."""
    return last_token_time - arrival_time


@dataclass(slots=True)
class RequestMetrics:
    """The one timing record of a request, kept by the core on its clock (seconds).

    ``RequestOutput.metrics`` is this object. ``first_scheduled_time`` is set when the request
    is first admitted to the running set, ``first_token_time``/``last_token_time`` when a step
    that samples for it is folded in, ``finished_time`` when it ends for any reason.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_in_queue(self) -> float | None:
        """Seconds from arrival to the first scheduling."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else time_to_first_token(self.arrival_time, self.first_token_time)

    def time_per_output_token(self, num_output_tokens: int) -> float | None:
        if self.first_token_time is None or self.last_token_time is None:
            return None
        return time_per_output_token(self.first_token_time, self.last_token_time, num_output_tokens)

    @property
    def e2e_latency(self) -> float | None:
        """Arrival to the last token (to the end, for a request that ended without tokens)."""
        end = self.last_token_time if self.last_token_time is not None else self.finished_time
        return None if end is None else e2e_latency(self.arrival_time, end)


@dataclass(slots=True)
class SchedulerStats:
    """Counters of one scheduler since it started (cumulative)."""

    num_steps: int = 0
    num_preemptions: int = 0
    num_prompt_tokens_computed: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0
    num_prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (first admission)


@dataclass(slots=True)
class EngineStats:
    """A snapshot of one engine core (``EngineCore.stats()``): state now and counters so far.

    ``num_kv_blocks_used``/``num_kv_blocks_total`` count KV blocks of ``block_size`` tokens;
    the counters are those of ``SchedulerStats``; ``jit`` is None when JIT is off. Prefix-cache
    hits and queries count tokens: ``num_cached_tokens`` of ``num_prefix_cache_queries`` looked up.
    """

    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_steps: int
    num_preemptions: int
    num_prompt_tokens_computed: int
    num_cached_tokens: int
    num_generated_tokens: int
    jit: JitStats | None = None
    num_prefix_cache_queries: int = 0

    @property
    def num_unfinished(self) -> int:
        return self.num_running + self.num_waiting

    @property
    def kv_usage(self) -> float:
        """Share of KV blocks in use, 0..1."""
        return self.num_kv_blocks_used / self.num_kv_blocks_total if self.num_kv_blocks_total else 0.0

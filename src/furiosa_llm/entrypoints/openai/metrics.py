"""Prometheus metrics of the server (seconds as the unit) and the periodic stats log line.

Per-request counters and latency histograms are observed as requests finish, with the
formulas of ``furiosa_llm.core.metrics``; the engine's state (requests running and waiting,
KV blocks in use, preemptions, token counters) is read at scrape time from one
``EngineStats`` snapshot (``LLMEngine.stats()``), never from the scheduler's attributes.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from furiosa_llm.core.metrics import EngineStats, e2e_latency, time_per_output_token, time_to_first_token

logger = logging.getLogger("furiosa_llm.server")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    """Engine state at scrape time."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        st = engine_stats(self.engine)
        labels = ["model_name"]
        values = [self.model_name]
        for name, doc, value in (
            ("furiosa_llm:num_requests_running", "Requests in the running set.", st.num_running),
            ("furiosa_llm:num_requests_waiting", "Requests waiting to be scheduled.", st.num_waiting),
            ("furiosa_llm:kv_cache_blocks_used", "KV cache blocks in use.", st.num_kv_blocks_used),
            ("furiosa_llm:kv_cache_blocks_total", "KV cache blocks in all.", st.num_kv_blocks_total),
            ("furiosa_llm:kv_cache_usage_perc", "Share of KV cache blocks in use (0-1).", st.kv_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            yield g
        c = CounterMetricFamily("furiosa_llm:num_preemptions", "Requests preempted (recomputed later).", labels=labels)
        c.add_metric(values, st.num_preemptions)
        yield c


def engine_stats(engine) -> EngineStats:
    """The snapshot of the synchronous engine under an ``AsyncLLMEngine``."""
    return engine.native_engine.stats()


class ServerMetrics:
    def __init__(self, engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.registry = CollectorRegistry()
        reg, lbl = self.registry, ["model_name"]
        self.prompt_tokens = Counter("furiosa_llm:prompt_tokens", "Prompt tokens of finished requests.", lbl, registry=reg)
        self.generation_tokens = Counter("furiosa_llm:generation_tokens", "Generated tokens.", lbl, registry=reg)
        self.request_success = Counter("furiosa_llm:request_success", "Finished requests by finish reason.",
                                       lbl + ["finished_reason"], registry=reg)
        self.ttft = Histogram("furiosa_llm:time_to_first_token_seconds", "Time to first token.", lbl,
                              buckets=LATENCY_BUCKETS, registry=reg)
        self.tpot = Histogram("furiosa_llm:time_per_output_token_seconds", "Time per output token after the first.",
                              lbl, buckets=TOKEN_BUCKETS, registry=reg)
        self.e2e = Histogram("furiosa_llm:e2e_request_latency_seconds", "Arrival to last token.", lbl,
                             buckets=LATENCY_BUCKETS, registry=reg)
        reg.register(_EngineCollector(engine, model_name))

    def observe(self, num_prompt_tokens: int, num_generated: int, finish_reason: str | None, metrics) -> None:
        """Record one finished request (``metrics`` is its ``RequestMetrics``)."""
        m = self.model_name
        self.prompt_tokens.labels(m).inc(num_prompt_tokens)
        self.generation_tokens.labels(m).inc(num_generated)
        self.request_success.labels(m, finish_reason or "abort").inc()
        if metrics is None or metrics.first_token_time is None:
            return
        first = metrics.first_token_time
        last = metrics.last_token_time if metrics.last_token_time is not None else first
        self.ttft.labels(m).observe(max(0.0, time_to_first_token(metrics.arrival_time, first)))
        if num_generated > 1:
            self.tpot.labels(m).observe(max(0.0, time_per_output_token(first, last, num_generated)))
        self.e2e.labels(m).observe(max(0.0, e2e_latency(metrics.arrival_time, last)))

    def aborted(self, n: int = 1) -> None:
        """Requests whose client went away before they finished."""
        self.request_success.labels(self.model_name, "abort").inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def log_periodically(self, interval_s: float) -> None:
        """Every ``interval_s``: prompt and generation throughput, requests, KV usage."""
        last_t = time.monotonic()
        last_p = last_g = 0.0
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            st = engine_stats(self.engine)
            p, g = st.num_prompt_tokens_computed, st.num_generated_tokens
            dt = max(now - last_t, 1e-9)
            if p == last_p and g == last_g and not st.num_unfinished:
                last_t = now
                continue  # idle: nothing to report
            logger.info(
                "throughput: prompt %.1f tok/s, generation %.1f tok/s; running %d, waiting %d; KV usage %.1f%% "
                "(%d/%d blocks); preemptions %d",
                (p - last_p) / dt, (g - last_g) / dt, st.num_running, st.num_waiting,
                100.0 * st.kv_usage, st.num_kv_blocks_used, st.num_kv_blocks_total, st.num_preemptions,
            )
            last_t, last_p, last_g = now, p, g

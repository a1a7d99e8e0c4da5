"""Prometheus metrics of the server (seconds as the unit) and the periodic stats log line.

Per-request counters and latency histograms are observed as requests finish; the engine's
state (requests running and waiting, KV blocks in use, preemptions) is read at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger("furiosa_llm.server")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    """Engine state at scrape time."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        sched = self.engine.native_engine.core.scheduler
        alloc = sched.allocator
        labels = ["model_name"]
        values = [self.model_name]
        for name, doc, value in (
            ("furiosa_llm:num_requests_running", "Requests in the running set.", len(sched.running)),
            ("furiosa_llm:num_requests_waiting", "Requests waiting to be scheduled.", len(sched.waiting)),
            ("furiosa_llm:kv_cache_blocks_used", "KV cache blocks in use.", alloc.num_used),
            ("furiosa_llm:kv_cache_blocks_total", "KV cache blocks in all.", alloc.num_blocks),
            ("furiosa_llm:kv_cache_usage_perc", "Share of KV cache blocks in use (0-1).", alloc.num_used / alloc.num_blocks),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            yield g
        c = CounterMetricFamily("furiosa_llm:num_preemptions", "Requests preempted (recomputed later).", labels=labels)
        c.add_metric(values, sched.stats.num_preemptions)
        yield c


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
        self.ttft.labels(m).observe(max(0.0, metrics.first_token_time - metrics.arrival_time))
        last = metrics.last_token_time or metrics.first_token_time
        if num_generated > 1:
            self.tpot.labels(m).observe(max(0.0, (last - metrics.first_token_time) / (num_generated - 1)))
        self.e2e.labels(m).observe(max(0.0, (metrics.finished_time or last) - metrics.arrival_time))

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
            sched = self.engine.native_engine.core.scheduler
            p, g = sched.stats.num_prompt_tokens_computed, sched.stats.num_generated_tokens
            alloc = sched.allocator
            dt = max(now - last_t, 1e-9)
            if p == last_p and g == last_g and not sched.running and not sched.waiting:
                last_t = now
                continue  # idle: nothing to report
            logger.info(
                "throughput: prompt %.1f tok/s, generation %.1f tok/s; running %d, waiting %d; KV usage %.1f%% "
                "(%d/%d blocks); preemptions %d",
                (p - last_p) / dt, (g - last_g) / dt, len(sched.running), len(sched.waiting),
                100.0 * alloc.num_used / alloc.num_blocks, alloc.num_used, alloc.num_blocks, sched.stats.num_preemptions,
            )
            last_t, last_p, last_g = now, p, g

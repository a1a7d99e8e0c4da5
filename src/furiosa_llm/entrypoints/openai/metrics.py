"""Prometheus metrics of the server, under Furiosa-LLM's names, and the periodic stats log line.

The series are those Furiosa-LLM's server documents (``furiosa_llm_*``, labels ``model_name`` and
``leader_device``), seconds as the unit of time:

- engine state, read at scrape time from one ``EngineStats`` snapshot
  (``engine.native_engine.stats()``; nothing else of the engine is read): the gauges
  ``furiosa_llm_num_requests_running``, ``..._waiting``, ``furiosa_llm_kv_cache_usage_percent``
  (0-1) and the counters ``furiosa_llm_prefix_cache_hits_total`` / ``..._queries_total``
  (tokens found in / looked up in the prefix cache), ``furiosa_llm_prompt_tokens_total``
  (prefill tokens computed), ``furiosa_llm_generation_tokens_total``, plus vLLM's
  ``furiosa_llm_num_preemptions_total`` and ``furiosa_llm_cache_config_info``; with JIT on, the
  experimental ``furiosa_llm_wire_hit_rate`` (share of decode steps that ran on a compiled
  bucket) and ``furiosa_llm_jit_wire_compilation_time_seconds`` (sum and count only);
- per finished request, observed by the server with the formulas of ``furiosa_llm.core.metrics``:
  ``furiosa_llm_request_success_total{finished_reason}`` and the histograms
  ``furiosa_llm_request_prompt_tokens``, ``..._request_generation_tokens``,
  ``..._request_params_n``, ``..._request_params_max_tokens``,
  ``furiosa_llm_time_to_first_token_seconds``, ``furiosa_llm_inter_token_latency_seconds`` and
  ``furiosa_llm_e2e_request_latency_seconds``.

With data-parallel replicas (``--data-parallel-size`` > 1) the engine-state series above sum the
replicas, and ``furiosa_llm_replica_*`` series carry a ``replica`` label (``replica_families``).

Inter-token latency: the core keeps a request's first and last token times, so a request of n
tokens adds n-1 observations of its mean interval (``time_per_output_token``); the histogram's
sum and count are exact, its buckets hold each request's mean.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from furiosa_llm.core.metrics import EngineStats, e2e_latency, time_per_output_token, time_to_first_token

logger = logging.getLogger("furiosa_llm.server")

PREFIX = "furiosa_llm_"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
N_BUCKETS = (1, 2, 5, 10, 20)


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_model_len``."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            v = m * scale
            if v > max(max_model_len, 1):
                return tuple(out)
            out.append(v)
        scale *= 10


class _Hist:
    """A histogram that can take one value ``n`` times at once (cumulative buckets at render)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cum, buckets = 0, []
        for bound, c in zip(self.bounds, self.counts):
            cum += c
            buckets.append((floatToGoString(bound), cum))
        buckets.append(("+Inf", self.count))
        family.add_metric(labels, buckets, self.sum)


def engine_stats(engine) -> EngineStats:
    """The snapshot of the synchronous engine under an ``AsyncLLMEngine``: the only engine state read."""
    return engine.native_engine.stats()


class ServerMetrics:
    """The server's series (see the module doc); ``render()`` gives Prometheus' text format."""

    def __init__(self, engine, model_name: str, *, leader_device: str = "cpu", max_model_len: int = 2048,
                 block_size: int | None = None, enable_prefix_caching: bool | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.labels = [model_name, leader_device]
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        tokens = token_buckets(max_model_len)
        self.hists: dict[str, tuple[str, _Hist]] = {
            "request_prompt_tokens": ("Number of prefill tokens processed, per request.", _Hist(tokens)),
            "request_generation_tokens": ("Number of generation tokens processed, per request.", _Hist(tokens)),
            "request_params_n": ("Histogram of the n request parameter.", _Hist(N_BUCKETS)),
            "request_params_max_tokens": ("Histogram of the max_tokens request parameter.", _Hist(tokens)),
            "time_to_first_token_seconds": ("Histogram of time to first token in seconds.", _Hist(TTFT_BUCKETS)),
            "inter_token_latency_seconds": ("Histogram of inter-token latency in seconds.", _Hist(ITL_BUCKETS)),
            "e2e_request_latency_seconds": ("Histogram of end to end request latency in seconds.",
                                            _Hist(E2E_BUCKETS)),
        }
        self.success: dict[str, int] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # ---- observations (the event loop's thread) ----------------------------------------------
    def observe(self, num_prompt_tokens: int, num_generated: int, finish_reason: str | None, metrics, *,
                n: int = 1, max_tokens: int | None = None) -> None:
        """Record one finished request (``metrics`` is its ``RequestMetrics``)."""
        reason = finish_reason or "abort"
        self.success[reason] = self.success.get(reason, 0) + 1
        h = self.hists
        h["request_prompt_tokens"][1].observe(num_prompt_tokens)
        h["request_generation_tokens"][1].observe(num_generated)
        h["request_params_n"][1].observe(n)
        if max_tokens is not None:
            h["request_params_max_tokens"][1].observe(max_tokens)
        if metrics is None or metrics.first_token_time is None:
            return
        first = metrics.first_token_time
        last = metrics.last_token_time if metrics.last_token_time is not None else first
        h["time_to_first_token_seconds"][1].observe(max(0.0, time_to_first_token(metrics.arrival_time, first)))
        if num_generated > 1:
            h["inter_token_latency_seconds"][1].observe(max(0.0, time_per_output_token(first, last, num_generated)),
                                                        num_generated - 1)
        h["e2e_request_latency_seconds"][1].observe(max(0.0, e2e_latency(metrics.arrival_time, last)))

    def aborted(self, n: int = 1) -> None:
        """Requests whose client went away before they finished."""
        self.success["abort"] = self.success.get("abort", 0) + n

    def failed(self, n: int = 1) -> None:
        """Requests the engine ended with an error (their step failed): ``finished_reason="error"``."""
        self.success["error"] = self.success.get("error", 0) + n

    # ---- the collector ---------------------------------------------------------------------
    def collect(self):
        st = engine_stats(self.engine)
        names = ["model_name", "leader_device"]
        lv = self.labels
        for name, doc, value in (
            ("num_requests_running", "Number of requests currently running.", st.num_running),
            ("num_requests_waiting", "Number of requests waiting to be processed.", st.num_waiting),
            ("kv_cache_usage_percent", "KV-cache usage. 1 means 100 percent usage.", st.kv_usage),
        ):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=names)
            g.add_metric(lv, value)
            yield g
        info = GaugeMetricFamily(PREFIX + "cache_config_info", "Information of the KV cache configuration.",
                                 labels=names + ["block_size", "num_gpu_blocks", "enable_prefix_caching"])
        info.add_metric(lv + [str(self.block_size or ""), str(st.num_kv_blocks_total),
                              str(self.enable_prefix_caching).lower()], 1.0)
        yield info
        for name, doc, value in (
            ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", st.num_cached_tokens),
            ("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             st.num_prefix_cache_queries),
            ("prompt_tokens", "Number of prefill tokens processed.", st.num_prompt_tokens_computed),
            ("generation_tokens", "Number of generation tokens processed.", st.num_generated_tokens),
            ("num_preemptions", "Cumulative number of preemptions (requests recomputed later).", st.num_preemptions),
        ):
            c = CounterMetricFamily(PREFIX + name, doc, labels=names)
            c.add_metric(lv, value)
            yield c
        c = CounterMetricFamily(PREFIX + "request_success", "Count of successfully processed requests.",
                                labels=names + ["finished_reason"])
        for reason, count in sorted(self.success.items()):
            c.add_metric(lv + [reason], count)
        yield c
        for name, (doc, hist) in self.hists.items():
            f = HistogramMetricFamily(PREFIX + name, doc, labels=names)
            hist.add_to(f, lv)
            yield f
        if st.jit is not None:
            g = GaugeMetricFamily(PREFIX + "wire_hit_rate", "(Experimental) Wire pipeline hit rate: share of "
                                  "bucketable decode steps that ran on a compiled bucket.", labels=names)
            g.add_metric(lv, st.jit.hit_rate)
            yield g
            f = HistogramMetricFamily(PREFIX + "jit_wire_compilation_time_seconds",
                                      "(Experimental) Time spent on JIT wire compilations in seconds "
                                      "(sum and count only).", labels=names)
            f.add_metric(lv, [("+Inf", st.jit.compilations_finished)], st.jit.compile_seconds_total)
            yield f

        replicas = getattr(getattr(self.engine, "native_engine", None), "replica_stats", None)
        if callable(replicas):
            yield from replica_families(replicas(), names, lv)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def log_periodically(self, interval_s: float) -> None:
        """Every ``interval_s``: prompt and generation throughput, requests, KV usage, prefix-cache hit rate."""
        last_t = time.monotonic()
        last = engine_stats(self.engine)
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            st = engine_stats(self.engine)
            dt = max(now - last_t, 1e-9)
            busy = (st.num_prompt_tokens_computed != last.num_prompt_tokens_computed
                    or st.num_generated_tokens != last.num_generated_tokens or st.num_unfinished)
            if busy:
                queries = st.num_prefix_cache_queries - last.num_prefix_cache_queries
                hits = st.num_cached_tokens - last.num_cached_tokens
                logger.info(
                    "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
                    "Waiting: %d reqs, KV cache usage: %.1f%% (%d/%d blocks), Prefix cache hit rate: %.1f%%, "
                    "Preemptions: %d",
                    (st.num_prompt_tokens_computed - last.num_prompt_tokens_computed) / dt,
                    (st.num_generated_tokens - last.num_generated_tokens) / dt, st.num_running, st.num_waiting,
                    100.0 * st.kv_usage, st.num_kv_blocks_used, st.num_kv_blocks_total,
                    100.0 * hits / queries if queries else 0.0, st.num_preemptions,
                )
            last_t, last = now, st


def replica_families(replicas: list[dict], names: list[str], lv: list[str]):
    """Per-replica series of a data-parallel engine (``DataParallelEngine.replica_stats()``), label ``replica``."""
    rn = names + ["replica"]
    gauges = (("num_requests_running", "Requests running on the replica.", lambda r, s: s.num_running),
              ("num_requests_waiting", "Requests waiting on the replica.", lambda r, s: s.num_waiting),
              ("kv_cache_usage_percent", "The replica's KV-cache usage (0-1).", lambda r, s: s.kv_usage),
              ("outstanding_tokens", "The replica's outstanding work in tokens, as the router counts it.",
               lambda r, s: r["outstanding_tokens"]),
              ("available", "1 while the replica takes requests, 0 while it restarts.",
               lambda r, s: float(r["available"])))
    counters = (("generation_tokens", "Generation tokens the replica processed.", lambda r, s: s.num_generated_tokens),
                ("prompt_tokens", "Prefill tokens the replica processed.", lambda r, s: s.num_prompt_tokens_computed),
                ("requests_routed", "Requests the front routed to the replica.", lambda r, s: r["routed"]),
                ("requests_failed", "Requests that failed because the replica failed.", lambda r, s: r["failed"]),
                ("restarts", "Times the replica was restarted after a failure.", lambda r, s: r["restarts"]))
    for family, specs in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
        for name, doc, get in specs:
            f = family(PREFIX + "replica_" + name, doc, labels=rn)
            for r in replicas:
                st = r["stats"]
                if st is not None:
                    f.add_metric(lv + [str(r["replica"])], get(r, st))
            yield f

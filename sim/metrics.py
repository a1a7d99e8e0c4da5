"""Serving metrics with the names of vLLM's serving benchmark, and SLOs.

TTFT (arrival to first token), TPOT (per request: time after the first token over the tokens
after it), ITL (gaps between a request's consecutive tokens) and E2EL (arrival to last token),
each as mean, median, std, p90 and p99 in milliseconds; request and token throughput; goodput:
requests per second that meet every SLO. The formulas are the core's (``core.metrics``).

``MetricsRecorder`` takes every measurement of a run through its hooks (``on_arrival``,
``on_reject``, ``on_outputs`` or ``on_tokens``, ``on_step``, ``on_replica_end``, ``on_end``);
nothing else in a run measures.
"""

from __future__ import annotations

import math
import numbers
from array import array
from dataclasses import dataclass

import numpy as np

from furiosa_llm.core.metrics import EngineStats, RequestMetrics, e2e_latency, time_per_output_token, time_to_first_token

PERCENTILES = (90, 99)


@dataclass(frozen=True, slots=True)
class SLO:
    """Per-request latency targets in milliseconds (None = no target) and the share that must meet them."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    attainment: float = 0.9

    def __post_init__(self) -> None:
        for k in ("ttft_ms", "tpot_ms", "e2el_ms"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0 < v < math.inf):
                raise ValueError(f"slo {k}={v!r}: must be a finite number > 0 (or None: no target)")
        if not isinstance(self.attainment, numbers.Real) or isinstance(self.attainment, bool) or not 0 < self.attainment <= 1:
            raise ValueError(f"slo attainment={self.attainment!r}: must be in (0, 1]")

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None

    def met(self, ttft_ms: np.ndarray, tpot_ms: np.ndarray, e2el_ms: np.ndarray) -> np.ndarray:
        ok = np.ones(len(ttft_ms), dtype=bool)
        if self.ttft_ms is not None:
            ok &= ttft_ms <= self.ttft_ms
        if self.tpot_ms is not None:
            ok &= tpot_ms <= self.tpot_ms
        if self.e2el_ms is not None:
            ok &= e2el_ms <= self.e2el_ms
        return ok


def latency_stats(name: str, values_ms: np.ndarray) -> dict[str, float]:
    """mean, median, std, p90 and p99 of ``values_ms`` as ``{stat}_{name}_ms`` keys (vLLM's names)."""
    if len(values_ms) == 0:
        vals = {"mean": math.nan, "median": math.nan, "std": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    else:
        vals = {"mean": float(values_ms.mean()), "median": float(np.median(values_ms)), "std": float(values_ms.std()),
                **{f"p{p}": float(np.percentile(values_ms, p)) for p in PERCENTILES}}
    return {f"{k}_{name}_ms": v for k, v in vals.items()}


class MetricsRecorder:
    """Collects a run's measurements: per-request timings, KV usage per step, each replica's counters.

    A request's timing record is a ``RequestMetrics``: the core's own (the first ``CoreOutput``
    of a request carries it, on the core's clock) when outputs come from an engine core, else
    one the recorder keeps from ``on_tokens``' times. ITL gaps are taken per token as they come.
    """

    def __init__(self) -> None:
        self._live: dict[str, list] = {}  # rid -> [timing record, n_in, index, n_out, last token time]
        self.index = array("q")  # the request's position in the workload
        self.arrival = array("d")
        self.first = array("d")
        self.last = array("d")
        self.n_in = array("q")
        self.n_out = array("q")
        self.itl = array("d")
        self.num_rejected = 0
        self.num_aborted = 0
        self.duration = 0.0
        self._last_event = 0.0  # the latest arrival or step: where the run's duration ends
        self.kv: dict[int, tuple[array, array]] = {}  # replica -> (times, KV blocks in use) after each step
        self.replicas: dict[int, dict] = {}  # replica -> its devices and counters at the end of the run

    # ---- hooks ---------------------------------------------------------------------------------
    def on_arrival(self, request_id: str, now: float, num_input_tokens: int, index: int = -1) -> None:
        """A request arrived and was queued."""
        self._live[request_id] = [RequestMetrics(now), num_input_tokens, index, 0, 0.0]
        self._last_event = max(self._last_event, now)

    def on_reject(self, now: float) -> None:
        """A request was refused on arrival at ``now`` (too long for the engine's context)."""
        self.num_rejected += 1
        self._last_event = max(self._last_event, now)

    def on_outputs(self, outputs) -> int:
        """A step's ``CoreOutput``s; returns how many requests completed.

        Times come from each request's timing record (the core stamped its tokens when it
        folded the step in).
        """
        live_get, itl_append = self._live.get, self.itl.append
        done = 0
        for o in outputs:
            rec = live_get(o.request_id)
            if rec is None:
                continue
            m = o.metrics
            if m is not None:  # the request's first output carries its record
                rec[0] = m
            else:
                m = rec[0]
            new = o.new_token_ids
            if new:
                t = m.last_token_time
                if rec[3]:
                    itl_append(t - rec[4])
                rec[4] = t
                rec[3] += len(new)
            if o.finish_reason is not None:  # a pooling request completes with its vector and no tokens
                done += self._end(o.request_id, o.finish_reason == "abort", pooled=o.pooled is not None)
        return done

    def on_tokens(self, request_id: str, num_tokens: int, now: float, finished: bool, aborted: bool = False) -> bool:
        """``num_tokens`` new tokens reached the user at ``now`` (an engine whose outputs carry no record).

        Returns True when the request completed.
        """
        rec = self._live.get(request_id)
        if rec is None:
            return False
        if num_tokens:
            m = rec[0]
            if m.first_token_time is None:
                m.first_token_time = now
            else:
                self.itl.append(now - m.last_token_time)
            m.last_token_time = now
            rec[3] += num_tokens
        return self._end(request_id, aborted) if finished else False

    def on_step(self, replica: int, now: float, num_kv_blocks_used: int) -> None:
        """A replica folded a step in: sample its KV usage (blocks in use)."""
        kv = self.kv.get(replica)
        if kv is None:
            kv = self.kv[replica] = (array("d"), array("q"))
        kv[0].append(now)
        kv[1].append(num_kv_blocks_used)
        if now > self._last_event:
            self._last_event = now

    def on_replica_end(self, replica: int, devices: str, stats: EngineStats, device_busy_s: float,
                       device_time: dict | None = None) -> None:
        """A replica's devices, its core's counters and where its device time went, at the end of the run."""
        info = {"devices": devices, "num_kv_blocks": stats.num_kv_blocks_total, "num_steps": stats.num_steps,
                "num_preemptions": stats.num_preemptions, "num_cached_tokens": stats.num_cached_tokens,
                "device_busy_s": device_busy_s}
        if device_time is not None:
            info["device_time"] = device_time
        if stats.jit is not None:
            info["jit"] = stats.jit.as_dict()
        self.replicas[replica] = info

    def on_end(self) -> None:
        """The run ended: it lasted until its last arrival or step (vLLM's benchmark duration: until the last
        request is done), not until a JIT compilation still running in the background would end."""
        self.duration = max(self.duration, self._last_event)

    def _end(self, request_id: str, aborted: bool, pooled: bool = False) -> bool:
        rec = self._live.pop(request_id)
        if aborted or (rec[3] == 0 and not pooled):
            self.num_aborted += 1
            return False
        m = rec[0]
        self.index.append(rec[2])
        self.arrival.append(m.arrival_time)
        self.first.append(m.first_token_time)
        self.last.append(m.last_token_time)
        self.n_in.append(rec[1])
        self.n_out.append(rec[3])
        return True

    # ---- results -------------------------------------------------------------------------------
    @property
    def num_completed(self) -> int:
        return len(self.arrival)

    @classmethod
    def merge(cls, parts: list["MetricsRecorder"]) -> "MetricsRecorder":
        """The recorders of disjoint sets of replicas as one; requests ordered by workload position.

        The order does not depend on how the replicas were split, so neither do the reports.
        """
        m = cls()
        for p in parts:
            for name in ("index", "arrival", "first", "last", "n_in", "n_out", "itl"):
                getattr(m, name).extend(getattr(p, name))
            m.num_rejected += p.num_rejected
            m.num_aborted += p.num_aborted
            m.duration = max(m.duration, p.duration)
            m.kv.update(p.kv)
            m.replicas.update(p.replicas)
        order = np.argsort(np.asarray(m.index, dtype=np.int64), kind="stable")
        for name in ("index", "arrival", "first", "last", "n_in", "n_out"):
            a = getattr(m, name)
            setattr(m, name, array(a.typecode, np.asarray(a)[order].tolist()))
        m.itl = array("d", np.sort(np.asarray(m.itl, dtype=float)).tolist())
        m.kv = dict(sorted(m.kv.items()))
        m.replicas = dict(sorted(m.replicas.items()))
        return m

    def per_request(self) -> dict[str, np.ndarray]:
        arrival, first, last = (np.asarray(a, dtype=float) for a in (self.arrival, self.first, self.last))
        n_out = np.asarray(self.n_out, dtype=np.int64)
        return {"arrival": arrival, "ttft_ms": time_to_first_token(arrival, first) * 1e3,
                "tpot_ms": time_per_output_token(first, last, n_out) * 1e3, "e2el_ms": e2e_latency(arrival, last) * 1e3,
                "n_in": np.asarray(self.n_in, dtype=np.int64), "n_out": n_out}

    def kv_usage(self) -> tuple[np.ndarray, np.ndarray]:
        """(time, share of all replicas' KV blocks in use): each replica's latest sample carried forward."""
        ids = sorted(self.kv)
        if not ids:
            return np.zeros(0), np.zeros(0)
        t_all = np.concatenate([np.asarray(self.kv[i][0], dtype=float) for i in ids])
        # each sample's change from the same replica's previous one; summed in time order
        delta = np.concatenate([np.diff(np.asarray(self.kv[i][1], dtype=float), prepend=0.0) for i in ids])
        order = np.argsort(t_all, kind="stable")
        total = sum(r["num_kv_blocks"] for r in self.replicas.values())  # a replica that never stepped used none
        return t_all[order], np.cumsum(delta[order]) / total

    def summary(self, duration_s: float, slo: SLO | None = None) -> dict:
        r = self.per_request()
        n = len(r["ttft_ms"])
        duration_s = max(duration_s, 1e-9)
        total_in, total_out = int(r["n_in"].sum()), int(r["n_out"].sum())
        out = {
            "completed": n,
            "rejected": self.num_rejected,
            "aborted": self.num_aborted,
            "duration": duration_s,
            "total_input_tokens": total_in,
            "total_output_tokens": total_out,
            "request_throughput": n / duration_s,
            "output_throughput": total_out / duration_s,
            "total_token_throughput": (total_in + total_out) / duration_s,
        }
        tpot = r["tpot_ms"][r["n_out"] > 1]
        itl = np.sort(np.asarray(self.itl, dtype=float)) * 1e3  # sorted: the same stats however parts merged
        for name, vals in (("ttft", r["ttft_ms"]), ("tpot", tpot), ("itl", itl), ("e2el", r["e2el_ms"])):
            out.update(latency_stats(name, vals))
        if slo is not None and not slo.empty:
            ok = slo.met(r["ttft_ms"], r["tpot_ms"], r["e2el_ms"])
            good = int(ok.sum())
            total = n + self.num_rejected + self.num_aborted
            out["request_goodput"] = good / duration_s
            out["slo_attainment"] = good / total if total else 0.0
        return out

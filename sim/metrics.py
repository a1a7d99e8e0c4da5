"""Serving metrics with the names of vLLM's serving benchmark, and SLOs.

TTFT (arrival to first token), TPOT (per request: time after the first token over the tokens
after it), ITL (gaps between a request's consecutive tokens) and E2EL (arrival to last token),
each as mean, median, std, p90 and p99 in milliseconds; request and token throughput; goodput:
requests per second that meet every SLO.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

import numpy as np

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
            if v is not None and not v > 0:
                raise ValueError(f"slo {k}={v!r}: must be > 0")
        if not 0 < self.attainment <= 1:
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
    """Collects per-request timings as outputs arrive (simulated or wall clock)."""

    def __init__(self) -> None:
        self._live: dict[str, list] = {}  # rid -> [arrival, first, last, n_in, n_out, index]
        self.index = array("q")  # the request's position in the workload
        self.arrival = array("d")
        self.first = array("d")
        self.last = array("d")
        self.n_in = array("q")
        self.n_out = array("q")
        self.itl = array("d")
        self.num_rejected = 0
        self.num_aborted = 0

    def on_arrival(self, request_id: str, now: float, num_input_tokens: int, index: int = -1) -> None:
        self._live[request_id] = [now, -1.0, -1.0, num_input_tokens, 0, index]

    def on_tokens(self, request_id: str, num_tokens: int, now: float, finished: bool, aborted: bool = False) -> bool:
        """Record ``num_tokens`` new tokens at ``now``; returns True when the request completed."""
        rec = self._live.get(request_id)
        if rec is None:
            return False
        if num_tokens:
            if rec[1] < 0:
                rec[1] = now
            else:
                self.itl.append(now - rec[2])
            rec[2] = now
            rec[4] += num_tokens
        if not finished:
            return False
        del self._live[request_id]
        if aborted or rec[4] == 0:
            self.num_aborted += 1
            return False
        self.index.append(rec[5])
        self.arrival.append(rec[0])
        self.first.append(rec[1])
        self.last.append(rec[2])
        self.n_in.append(rec[3])
        self.n_out.append(rec[4])
        return True

    def on_outputs(self, outputs, now: float) -> int:
        """Record a step's ``CoreOutput``s; returns how many requests completed."""
        on_tokens = self.on_tokens
        return sum(on_tokens(o.request_id, len(o.new_token_ids), now, o.finish_reason is not None) for o in outputs)

    @property
    def num_completed(self) -> int:
        return len(self.arrival)

    @classmethod
    def merge(cls, parts: list["MetricsRecorder"]) -> "MetricsRecorder":
        """Completed requests of several recorders, ordered by workload position (so order-independent)."""
        m = cls()
        for p in parts:
            for name in ("index", "arrival", "first", "last", "n_in", "n_out", "itl"):
                getattr(m, name).extend(getattr(p, name))
            m.num_rejected += p.num_rejected
            m.num_aborted += p.num_aborted
        order = np.argsort(np.asarray(m.index, dtype=np.int64), kind="stable")
        for name in ("index", "arrival", "first", "last", "n_in", "n_out"):
            a = getattr(m, name)
            setattr(m, name, array(a.typecode, np.asarray(a)[order].tolist()))
        m.itl = array("d", np.sort(np.asarray(m.itl, dtype=float)).tolist())
        return m

    def per_request(self) -> dict[str, np.ndarray]:
        arrival, first, last = (np.asarray(a, dtype=float) for a in (self.arrival, self.first, self.last))
        n_out = np.asarray(self.n_out, dtype=np.int64)
        ttft = (first - arrival) * 1e3
        e2el = (last - arrival) * 1e3
        tpot = np.where(n_out > 1, (last - first) * 1e3 / np.maximum(n_out - 1, 1), 0.0)
        return {"arrival": arrival, "ttft_ms": ttft, "tpot_ms": tpot, "e2el_ms": e2el,
                "n_in": np.asarray(self.n_in, dtype=np.int64), "n_out": n_out}

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

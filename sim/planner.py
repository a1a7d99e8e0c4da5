"""Capacity planning: the highest request rate that meets SLOs, offline throughput, and sweeps over configurations.

``max_rate`` brackets the rate (doubling or halving from a start) and then bisects it in log
space: each probe is one simulated run of the workload at that rate, and a rate passes when
the share of requests that meet every SLO is at least ``slo.attainment``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

from .config import SimConfig
from .metrics import SLO
from .simulation import simulate
from .workload import Workload


def _passes(config: SimConfig, workload: Workload, slo: SLO, rate: float, history: list, **sim) -> bool:
    res = simulate(config, workload.with_rate(rate), slo=slo, **sim)
    m = res.report["metrics"]
    ok = m["slo_attainment"] >= slo.attainment
    history.append({"request_rate": rate, "slo_attainment": m["slo_attainment"], "passes": ok,
                    "request_goodput": m["request_goodput"], "output_throughput": m["output_throughput"],
                    "median_ttft_ms": m["median_ttft_ms"], "median_tpot_ms": m["median_tpot_ms"],
                    "p99_ttft_ms": m["p99_ttft_ms"], "p99_tpot_ms": m["p99_tpot_ms"]})
    return ok


def max_rate(config: SimConfig, workload: Workload, slo: SLO, *, start: float = 1.0, rel_tol: float = 0.05,
             max_probes: int = 24, **sim) -> dict:
    """The highest request rate (req/s) at which ``config`` meets ``slo`` on ``workload``'s length mix.

    ``sim`` goes to ``simulate`` (``dispatch``, ``workers``).
    """
    if slo.empty:
        raise ValueError("slo: give at least one of ttft_ms, tpot_ms, e2el_ms")
    if not start > 0:
        raise ValueError(f"start={start!r}: must be > 0")
    history: list[dict] = []
    lo, hi = 0.0, None
    rate = start
    while len(history) < max_probes:
        if _passes(config, workload, slo, rate, history, **sim):
            lo = rate
            if hi is not None:
                break
            rate *= 2
        else:
            hi = rate
            if lo:
                break
            rate /= 2
            if rate < 1e-4:
                break
    while lo and hi and hi / lo > 1 + rel_tol and len(history) < max_probes:
        mid = (lo * hi) ** 0.5
        if _passes(config, workload, slo, mid, history, **sim):
            lo = mid
        else:
            hi = mid
    best = max((h for h in history if h["passes"]), key=lambda h: h["request_rate"], default=None)
    return {"max_request_rate": lo, "upper_bound": hi, "at_max": best, "probes": history}


SWEEPABLE = ("devices", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "npu_queue_limit",
             "max_processing_samples", "spare_blocks_ratio", "max_num_batched_tokens")


OBJECTIVES = ("max_rate", "offline_throughput")


def offline_throughput(config: SimConfig, workload: Workload, **sim) -> dict:
    """Every request of ``workload`` at t=0 (offline serving): the throughput ``config`` reaches and the run's figures."""
    m = simulate(config, workload.with_rate(math.inf), **sim).report["metrics"]
    return {"output_throughput": m["output_throughput"], "request_throughput": m["request_throughput"],
            "median_ttft_ms": m["median_ttft_ms"], "median_tpot_ms": m["median_tpot_ms"], "duration": m["duration"],
            "device_time": m.get("device_time")}


def sweep(config: SimConfig, workload: Workload, slo: SLO | None, grid: dict[str, list], *,
          objective: str = "max_rate", **kw) -> list[dict]:
    """``objective`` for every combination of the values in ``grid`` (keys from ``SWEEPABLE``).

    ``max_rate``: the highest request rate within ``slo`` (``kw`` goes to ``max_rate``);
    ``offline_throughput``: the output throughput with every request at t=0 (``slo`` unused).
    Each row holds the ``point`` (the swept values), the replica count and the objective's result,
    or an ``error`` when the point cannot run (e.g. the model does not fit its PEs).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: must be one of {', '.join(OBJECTIVES)}")
    for k in grid:
        if k not in SWEEPABLE:
            raise ValueError(f"sweep key {k!r}: must be one of {', '.join(SWEEPABLE)}")
    rows = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        cfg = replace(config, **point)  # SimConfig takes engine arguments and its own settings alike
        try:
            if objective == "max_rate":
                res = max_rate(cfg, workload, slo, **kw)
            else:
                res = offline_throughput(cfg, workload, **{k: v for k, v in kw.items() if k in ("dispatch", "workers")})
            rows.append({"point": point, "num_replicas": cfg.plan().num_replicas, **res})
        except ValueError as e:  # e.g. the model does not fit this many PEs
            rows.append({"point": point, "error": str(e), "max_request_rate": None, "output_throughput": None})
    return rows


def best(rows: list[dict], objective: str = "max_rate") -> dict | None:
    """The row of ``sweep`` that does best on ``objective`` (None when no point could run)."""
    key = "max_request_rate" if objective == "max_rate" else "output_throughput"
    return max((r for r in rows if r.get(key)), key=lambda r: r[key], default=None)

"""Capacity planning: the highest request rate that meets SLOs, and sweeps over configurations.

``max_rate`` brackets the rate (doubling or halving from a start) and then bisects it in log
space: each probe is one simulated run of the workload at that rate, and a rate passes when
the share of requests that meet every SLO is at least ``slo.attainment``.
"""

from __future__ import annotations

import itertools
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


def sweep(config: SimConfig, workload: Workload, slo: SLO, grid: dict[str, list], **kw) -> list[dict]:
    """``max_rate`` for every combination of the values in ``grid`` (keys from ``SWEEPABLE``).

    Each row holds the ``point`` (the swept values), the replica count and ``max_rate``'s result,
    or an ``error`` when the point cannot run (e.g. the model does not fit its PEs).
    """
    for k in grid:
        if k not in SWEEPABLE:
            raise ValueError(f"sweep key {k!r}: must be one of {', '.join(SWEEPABLE)}")
    rows = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        cfg = replace(config, **point)  # SimConfig takes engine arguments and its own settings alike
        try:
            res = max_rate(cfg, workload, slo, **kw)
            rows.append({"point": point, "num_replicas": cfg.plan().num_replicas, **res})
        except ValueError as e:  # e.g. the model does not fit this many PEs
            rows.append({"point": point, "error": str(e), "max_request_rate": None})
    return rows

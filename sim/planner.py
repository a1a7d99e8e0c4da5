"""Capacity planning: the highest request rate that meets SLOs, offline throughput, and sweeps over configurations.

``max_rate`` brackets the rate (doubling or halving from a start) and then bisects it in log
space: each probe is one simulated run of the workload at that rate, and a rate passes when
the share of requests that meet every SLO is at least ``slo.attainment``; given ``ray``, it
probes the rates it may need next in parallel. ``sweep`` runs ``max_rate`` for every point of a
grid, one after another or, given ``ray``, each point's search as a Ray task
(``distributed.py``); the results are the same either way.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import replace
from typing import Callable

import numpy as np

from .config import SimConfig
from .metrics import SLO
from .simulation import simulate
from .workload import Workload


def _probe(config: SimConfig, workload: Workload, slo: SLO, rate: float, sim: dict) -> dict:
    """One simulated run at ``rate``: the row of the search's history (``passes``: SLOs met)."""
    res = simulate(config, workload.with_rate(rate), slo=slo, **sim)
    m = res.report["metrics"]
    ok = m["slo_attainment"] >= slo.attainment
    return {"request_rate": rate, "slo_attainment": m["slo_attainment"], "passes": ok,
            "request_goodput": m["request_goodput"], "output_throughput": m["output_throughput"],
            "median_ttft_ms": m["median_ttft_ms"], "median_tpot_ms": m["median_tpot_ms"],
            "p99_ttft_ms": m["p99_ttft_ms"], "p99_tpot_ms": m["p99_tpot_ms"], "duration": m["duration"]}


MIN_RATE = 1e-4  # req/s: the search stops halving below this (no rate passes)
SEARCH_SETTINGS = ("start", "rel_tol", "max_probes")  # max_rate's keywords that steer the search
STEADY_RATIO = 2.0  # a run at the max rate lasting over this many times its arrival span is not ``steady``


# The search as a state machine, so it can look ahead: (phase, lo, hi, rate to probe, probes so far).
def _settle(lo: float, hi: float | None, n: int, rel_tol: float, max_probes: int) -> tuple:
    if lo and hi and hi / lo > 1 + rel_tol and n < max_probes:
        return ("bisect", lo, hi, (lo * hi) ** 0.5, n)
    return ("done", lo, hi, None, n)


def _advance(state: tuple, ok: bool, rel_tol: float, max_probes: int) -> tuple:
    """The state after the probe of ``state`` passed (``ok``) or not: doubling/halving, then log-space bisection."""
    phase, lo, hi, rate, n = state
    n += 1
    if phase == "bisect":
        return _settle(rate, hi, n, rel_tol, max_probes) if ok else _settle(lo, rate, n, rel_tol, max_probes)
    if ok:
        lo = rate
        if hi is not None:
            return _settle(lo, hi, n, rel_tol, max_probes)
        rate *= 2
    else:
        hi = rate
        if lo:
            return _settle(lo, hi, n, rel_tol, max_probes)
        rate /= 2
        if rate < MIN_RATE:
            return _settle(lo, hi, n, rel_tol, max_probes)
    if n >= max_probes:
        return _settle(lo, hi, n, rel_tol, max_probes)
    return ("bracket", lo, hi, rate, n)


def _upcoming(state: tuple, known: dict, width: int, rel_tol: float, max_probes: int) -> list[float]:
    """Up to ``width`` rates the search may probe next, nearest first (breadth-first over both outcomes)."""
    out: list[float] = []
    frontier = [state]
    while frontier and len(out) < width:
        s = frontier.pop(0)
        if s[0] == "done":
            continue
        rate = s[3]
        if rate in known:
            frontier.append(_advance(s, known[rate]["passes"], rel_tol, max_probes))
            continue
        if rate not in out:
            out.append(rate)
        frontier += [_advance(s, True, rel_tol, max_probes), _advance(s, False, rel_tol, max_probes)]
    return out


def check_search(start: float = 1.0, rel_tol: float = 0.05, max_probes: int = 24,
                 names: tuple[str, str, str] = ("start", "rel_tol", "max_probes")) -> None:
    """``ValueError`` (naming the argument as ``names`` call it) unless the search's settings are usable."""
    if not isinstance(start, numbers.Real) or isinstance(start, bool) or not 0 < start < math.inf:
        raise ValueError(f"{names[0]}={start!r}: must be a finite rate > 0 (req/s)")
    if not isinstance(rel_tol, numbers.Real) or isinstance(rel_tol, bool) or not 0 < rel_tol <= 1:
        raise ValueError(f"{names[1]}={rel_tol!r}: must be a number in (0, 1] (the bracket's relative width at the end)")
    if not isinstance(max_probes, numbers.Integral) or isinstance(max_probes, bool) or max_probes < 1:
        raise ValueError(f"{names[2]}={max_probes!r}: must be an int >= 1")


def _check_rate_searchable(slo: SLO | None, workload: Workload) -> None:
    """``ValueError`` unless a max-rate search can run: an SLO to meet and arrivals whose rate can vary."""
    if not isinstance(slo, SLO) or slo.empty:
        raise ValueError(f"slo={slo!r}: the max_rate search needs an SLO with at least one of ttft_ms, tpot_ms, e2el_ms")
    if workload.arrival == "trace":
        raise ValueError("arrival='trace': a trace fixes the arrival times, so there is no request rate to search; "
                         "use poisson or gamma arrivals (lengths may still come from the trace), or simulate the "
                         "trace as it is")
    if not math.isinf(workload.request_rate):
        raise ValueError(f"request_rate={workload.request_rate!r}: the max_rate search sets the workload's rate itself; "
                         "leave it unset (inf)")


def max_rate(config: SimConfig, workload: Workload, slo: SLO, *, start: float = 1.0, rel_tol: float = 0.05,
             max_probes: int = 24, ray: str | None = None, **sim) -> dict:
    """The highest request rate (req/s) at which ``config`` meets ``slo`` on ``workload``'s length mix.

    ``sim`` goes to ``simulate`` (``dispatch``, ``workers``). With ``ray`` (``"local"``, ``"auto"`` or
    an address) each round probes, as Ray tasks, the next rates the search may need (as many as the
    cluster has CPUs, nearest first) and keeps only those on the search's path: the result, probe
    history included, is the same as without Ray, in fewer rounds.

    Returns ``max_request_rate`` (the highest rate that passed), ``upper_bound`` (the lowest that
    failed; None if none did), ``at_max`` (the passing probe at the max), ``probes`` (every probe in
    order), ``unbounded``, ``converged`` (False when ``max_probes`` ran out before the search
    closed: the max is then only the best rate probed) and ``steady`` (False when the run at the
    max lasted over ``STEADY_RATIO`` times its arrival span, ``num_requests / rate``: most of it came
    after the last arrival, so the workload is too short to show that the rate is sustained; more
    requests may give a lower one). When no probed rate fails, one more run puts every request at
    t=0 (offline); if the SLOs hold even then, ``max_request_rate`` is ``math.inf`` (null in JSON),
    ``unbounded`` is True and ``at_max`` is that offline run. Raises ``ValueError`` for an empty or
    missing SLO, a workload with a rate (the search sets it), a start rate that is not finite and
    > 0, ``rel_tol`` outside (0, 1] or ``max_probes`` < 1.
    """
    _check_rate_searchable(slo, workload)
    check_search(start, rel_tol, max_probes)
    width = 1
    if ray is not None:
        from .distributed import connect

        width = max(1, int(connect(ray).cluster_resources().get("CPU", 1)))
        if sim.get("workers", 1) > 1:  # each probe's replica groups on the same cluster
            sim = {**sim, "ray": ray}
    known: dict[float, dict] = {}
    history: list[dict] = []
    state = ("bracket", 0.0, None, start, 0) if max_probes > 0 else ("done", 0.0, None, None, 0)
    while state[0] != "done":
        rate = state[3]
        if rate not in known:
            want = _upcoming(state, known, width, rel_tol, max_probes)
            if ray is None:
                known.update((r, _probe(config, workload, slo, r, sim)) for r in want)
            else:
                from .distributed import run_tasks

                for i, row, error in run_tasks(_probe, [(config, workload, slo, r, sim) for r in want], ray_address=ray):
                    if error is not None:
                        raise RuntimeError(f"max_rate: the probe at {want[i]} req/s failed: {error}") from error
                    known[want[i]] = row
        entry = known[rate]
        history.append(entry)
        state = _advance(state, entry["passes"], rel_tol, max_probes)
    lo, hi = state[1], state[2]
    best = max((h for h in history if h["passes"]), key=lambda h: h["request_rate"], default=None)
    if lo and hi is None:  # no probed rate failed: the SLOs may hold however fast requests come
        offline = _probe(config, workload, slo, math.inf, sim)
        if offline["passes"]:
            lo, best = math.inf, offline
    unbounded = math.isinf(lo)
    # the search ended on its own terms: unbounded, a bracket within rel_tol, or no rate passing down to the floor
    converged = unbounded or (hi is not None and (hi / lo <= 1 + rel_tol if lo else hi < 2 * MIN_RATE))
    # the run at the max lasted more than twice its arrivals: mostly after the last one, too short to show a sustained rate
    steady = None if best is None else unbounded or best["duration"] <= STEADY_RATIO * workload.num_requests / lo
    return {"max_request_rate": lo, "upper_bound": hi, "unbounded": unbounded, "converged": converged,
            "steady": steady, "at_max": best, "probes": history}


SWEEPABLE = ("devices", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "npu_queue_limit",
             "max_processing_samples", "spare_blocks_ratio", "max_num_batched_tokens")


OBJECTIVES = ("max_rate", "offline_throughput")


def offline_throughput(config: SimConfig, workload: Workload, **sim) -> dict:
    """Every request of ``workload`` at t=0 (offline serving): the throughput ``config`` reaches and the run's figures."""
    m = simulate(config, workload.with_rate(math.inf), **sim).report["metrics"]
    return {"output_throughput": m["output_throughput"], "request_throughput": m["request_throughput"],
            "median_ttft_ms": m["median_ttft_ms"], "median_tpot_ms": m["median_tpot_ms"], "duration": m["duration"],
            "device_time": m.get("device_time")}


def _sweep_point(config: SimConfig, workload: Workload, slo: SLO | None, point: dict, kw: dict) -> dict:
    """One row of a sweep: the objective (``kw["objective"]``, default ``max_rate``) at ``point``, or the
    ``error`` that stopped it (a bad point)."""
    kw = dict(kw)
    objective = kw.pop("objective", "max_rate")
    try:
        cfg = replace(config, **point)  # SimConfig takes engine arguments and its own settings alike
        if objective == "offline_throughput":
            res = offline_throughput(cfg, workload, **{k: v for k, v in kw.items() if k in ("dispatch", "workers")})
        else:
            res = max_rate(cfg, workload, slo, **kw)
        plan = cfg.plan()
        return {"point": point, "num_replicas": plan.num_replicas, "unused_devices": plan.unused_devices or None, **res}
    except ValueError as e:  # e.g. the model does not fit this many PEs
        return {"point": point, "error": str(e), "max_request_rate": None, "output_throughput": None}


def sweep(config: SimConfig, workload: Workload, slo: SLO | None, grid: dict[str, list], *, ray: str | None = None,
          progress: bool = False, on_row: Callable[[int, dict], None] | None = None, objective: str = "max_rate",
          **kw) -> list[dict]:
    """``objective`` for every combination of the values in ``grid`` (keys from ``SWEEPABLE``).

    ``max_rate``: the highest request rate within ``slo`` (``kw`` goes to ``max_rate``);
    ``offline_throughput``: the output throughput with every request at t=0 (``slo`` unused).
    Each row holds the ``point`` (the swept values), the replica count and the objective's result,
    or an ``error`` when the point cannot run (e.g. the model does not fit its PEs). Rows are in
    grid order.

    ``ray`` (``"local"``, ``"auto"`` or a cluster address; off when None) runs each point's search as
    a Ray task (a grid of one point: its search probes ahead on Ray, see ``max_rate``); rows are the
    same as without Ray, a point whose task fails (any exception, or its worker dies) gets an
    ``error`` row and the others complete. ``on_row(i, row)`` hears of each
    row as it is ready (in finishing order with Ray); ``progress`` shows a bar of finished points.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: must be one of {', '.join(OBJECTIVES)}")
    if not isinstance(grid, dict):
        raise ValueError(f"grid={grid!r}: must be a dict of sweep key -> list of values")
    swept: dict[str, list] = {}  # the grid's values as Python's (numpy's numbers too: the rows are JSON)
    for k, given in grid.items():
        if k not in SWEEPABLE:
            raise ValueError(f"sweep key {k!r}: must be one of {', '.join(SWEEPABLE)}")
        values = given.tolist() if isinstance(given, np.ndarray) else given
        if not isinstance(values, (list, tuple, range)) or not values:
            raise ValueError(f"sweep {k}={given!r}: must be a non-empty list of values")
        values = [v.item() if isinstance(v, np.generic) else v for v in values]
        if any(isinstance(v, (list, dict, set)) for v in values):
            raise ValueError(f"sweep {k}={given!r}: each value must be a single number or string")
        if len(set(values)) < len(values):
            raise ValueError(f"sweep {k}={given!r}: a value is given twice")
        swept[k] = values
    search = [k for k in SEARCH_SETTINGS if k in kw]
    if objective == "max_rate":
        _check_rate_searchable(slo, workload)
        check_search(**{k: kw[k] for k in search})
    else:  # every request at t=0: what a search, SLOs or an arrival process would set plays no part
        if slo is not None and slo != SLO():  # an SLO's targets or attainment would play no part
            raise ValueError(f"slo={slo!r}: the offline_throughput objective ranks by throughput alone; pass slo=None")
        if workload.arrival != "poisson" or not math.isinf(workload.request_rate):
            raise ValueError(f"arrival={workload.arrival!r}, request_rate={workload.request_rate!r}: the "
                             "offline_throughput objective sends every request at t=0; leave the arrivals unset")
        unknown = sorted(set(kw) - set(SEARCH_SETTINGS) - {"dispatch", "workers"})
        if unknown:
            raise TypeError(f"sweep: unknown argument(s) {', '.join(unknown)}")
        if search:
            raise ValueError(f"{', '.join(search)}: settings of the max_rate search; the offline_throughput objective "
                             "runs once")
    kw = {**kw, "objective": objective}
    keys = list(swept)
    points = [dict(zip(keys, values)) for values in itertools.product(*swept.values())]
    rows: list[dict] = [{}] * len(points)
    if ray is None:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(points), unit="point", desc="sweep")
        for i, point in enumerate(points):
            rows[i] = _sweep_point(config, workload, slo, point, kw)
            if bar is not None:
                bar.update(1)
            if on_row is not None:
                on_row(i, rows[i])
        if bar is not None:
            bar.close()
        return rows
    if len(points) == 1:  # one search: its probes go to Ray instead
        rows[0] = _sweep_point(config, workload, slo, points[0], {**kw, "ray": ray})
        if on_row is not None:
            on_row(0, rows[0])
        return rows
    from .distributed import run_tasks

    tasks = [(config, workload, slo, point, kw) for point in points]
    for i, row, error in run_tasks(_sweep_point, tasks, ray_address=ray, progress=progress, desc="sweep", unit="point"):
        if error is not None:
            row = {"point": points[i], "error": f"{type(error).__name__}: {error}", "max_request_rate": None,
                   "output_throughput": None}
        rows[i] = row
        if on_row is not None:
            on_row(i, row)
    return rows


def best(rows: list[dict], objective: str = "max_rate") -> dict | None:
    """The row of ``sweep`` that does best on ``objective`` (None when no point could run)."""
    key = "max_request_rate" if objective == "max_rate" else "output_throughput"
    return max((r for r in rows if r.get(key)), key=lambda r: r[key], default=None)

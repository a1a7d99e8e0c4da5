"""One simulated serving run: the production engine core on virtual RNGD cards, in simulated time.

``simulate`` resolves the configuration into a plan (``config.py``), runs the replicas
(``replica.py``) in this process or, for independent round-robin replicas, as several Ray tasks
(``distributed.py``), merges their recorders and assembles the report (``report.py``).
"""

from __future__ import annotations

import math
import numbers
import time

from furiosa_llm.hal import BatchExecutor

from . import replica
from .config import SimConfig, SimPlan
from .metrics import SLO, MetricsRecorder
from .replica import DISPATCH
from .report import SimResult, build_result, jsonable
from .workload import Workload

__all__ = ["SimConfig", "SimPlan", "SimResult", "jsonable", "simulate"]


def simulate(config: SimConfig, workload: Workload, *, slo: SLO | None = None, tokens: BatchExecutor | None = None,
             progress: bool = False, record_trace: bool = False, dispatch: str = "least_tokens",
             workers: int = 1, ray: str | None = None) -> SimResult:
    """Serve ``workload`` on the simulated devices of ``config``; deterministic for a given seed.

    ``dispatch`` (a policy of ``furiosa_llm.core.routing``) sends a new request to the replica with
    the fewest live requests (``least_loaded``), the least outstanding work in tokens
    (``least_tokens``) or to replica ``i % replicas`` (``round_robin``). Round-robin replicas are
    independent, so ``workers`` > 1 simulates them in that many groups, each a Ray task on the Ray
    named by ``ray`` (``"local"`` when None; see ``furiosa_llm.sim.distributed``), with the same
    report as one process. ``tokens`` executes batches for real token ids (one replica only); by
    default tokens are synthetic and the workload sets the output lengths.
    """
    t0 = time.perf_counter()
    for arg, v, kind in (("config", config, SimConfig), ("workload", workload, Workload)):
        if not isinstance(v, kind):
            raise TypeError(f"{arg}={v!r}: must be a {kind.__name__}")
    if slo is not None and not isinstance(slo, SLO):
        raise TypeError(f"slo={slo!r}: must be an SLO or None")
    if slo is not None and slo.empty:
        raise ValueError(f"slo={slo!r}: no target to meet; give ttft_ms, tpot_ms or e2el_ms, or pass slo=None")
    if workload.arrival == "gamma" and workload.burstiness != 1.0 and math.isinf(workload.request_rate):
        raise ValueError(f"burstiness={workload.burstiness!r}: with request_rate=inf every request arrives at t=0; give "
                         "gamma arrivals a rate")
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch={dispatch!r}: must be one of {', '.join(DISPATCH)}")
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers={workers!r}: must be an int >= 1")
    workers = int(workers)
    if workers > 1 and (dispatch != "round_robin" or tokens is not None or record_trace):
        raise ValueError(f"workers={workers}: parallel simulation needs dispatch='round_robin', synthetic tokens and "
                         "no decision trace")
    if ray is not None and workers == 1:
        raise ValueError(f"ray={ray!r}: simulate runs on Ray only to split replicas over workers > 1")
    plan = config.plan()
    n = plan.num_replicas
    if tokens is not None and n > 1:
        raise ValueError(f"tokens: a model token source holds the KV cache of one replica; these devices make "
                         f"{n} replicas (pass one device, or data_parallel_size=1)")
    workers = min(workers, n)  # a worker simulates whole replicas
    if workers == 1:
        part, traces = replica.run(plan, workload, list(range(n)), dispatch=dispatch, tokens=tokens,
                                   record_trace=record_trace, progress=progress)
        parts = [part]
    else:
        from .distributed import run_tasks

        groups = [list(range(n))[w::workers] for w in range(workers)]
        parts = [None] * workers
        for i, part, error in run_tasks(_run_round_robin, [(plan, workload, g) for g in groups],
                                        ray_address=ray or "local", desc="replica groups"):
            if error is not None:
                raise RuntimeError(f"workers={workers}: the Ray task of replicas {groups[i]} failed: {error}") from error
            parts[i] = part
        traces = {}
    recorder = MetricsRecorder.merge(parts)  # in workload order, so the report is the same however split
    return build_result(config, plan, workload, slo, dispatch, recorder, traces, time.perf_counter() - t0)


def _run_round_robin(plan: SimPlan, workload: Workload, replica_ids: list[int]) -> MetricsRecorder:
    """One worker's share of round-robin replicas (a Ray task)."""
    return replica.run(plan, workload, replica_ids, dispatch="round_robin")[0]

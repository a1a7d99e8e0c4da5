"""Capacity planning on the simulator backend: workloads, simulated runs, metrics, SLO search, reports.

``simulate(config, workload)`` runs the production scheduler (``furiosa_llm.core``) on virtual
RNGD cards (``furiosa_llm.hal.simulator``) and returns a ``SimResult`` whose ``report`` uses
the metric names of vLLM's serving benchmark. ``max_rate`` and ``sweep`` search request rates
under SLOs.
"""

from .config import SimConfig, SimPlan
from .metrics import SLO
from .planner import max_rate, sweep
from .report import SimResult
from .simulation import simulate
from .workload import LengthDist, Workload

__all__ = ["LengthDist", "SLO", "SimConfig", "SimPlan", "SimResult", "Workload", "max_rate", "simulate", "sweep"]

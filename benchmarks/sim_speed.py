"""How fast the simulator runs: 100,000 requests of Llama-3.1-8B on RNGD cards.

Prints JSON: wall and CPU seconds, simulated requests per wall second and per CPU second of one
core (``requests_per_s_per_core``), simulated seconds, and the run's serving metrics. Target
(issue 13): the one-process run in at most 60 wall seconds on the 2-core dev machine. On a shared
machine wall time is noisy; CPU seconds of the process are the steadier figure.
``--profile`` runs the one-process simulation under cProfile and adds each hot function's share
of the profiled time (cProfile slows small functions more, so shares are indicative).

    .venv/bin/python benchmarks/sim_speed.py [--num-requests 100000] [--devices npu:0,npu:1,npu:2,npu:3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import time

from furiosa_llm.sim import SLO, SimConfig, Workload, simulate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=100_000)
    p.add_argument("--devices", default="npu:0,npu:1,npu:2,npu:3")
    p.add_argument("--request-rate", type=float, default=24.0)
    p.add_argument("--input-len", default="lognormal:1024:0.5")
    p.add_argument("--output-len", default="lognormal:128:0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="profile the one-process run (cProfile) and print shares")
    p.add_argument("--one-process-only", action="store_true", help="skip the two-process round-robin run")
    a = p.parse_args()
    cfg = SimConfig(model="llama-3.1-8b", devices=a.devices, tensor_parallel_size=8)
    wl = Workload(num_requests=a.num_requests, request_rate=a.request_rate, input_len=a.input_len,
                  output_len=a.output_len, seed=a.seed)
    runs, profile = {}, None
    cases = [("least_tokens_1_process", {"dispatch": "least_tokens"})]  # the default dispatch
    if not a.one_process_only:
        from furiosa_llm.api.distributed import connect

        connect("local")  # the round-robin groups run as Ray tasks: Ray's start (~20 s here) stays outside the timing
        cases.append(("round_robin_2_ray_tasks", {"dispatch": "round_robin", "workers": 2}))
    for name, kw in cases:
        one_process = "workers" not in kw
        prof = cProfile.Profile() if a.profile and one_process else None
        t0, c0 = time.perf_counter(), time.process_time()
        if prof is not None:
            prof.enable()
        res = simulate(cfg, wl, slo=SLO(ttft_ms=2000, tpot_ms=100), **kw)
        if prof is not None:
            prof.disable()
            profile = _shares(prof)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = res.report["metrics"]
        runs[name] = {
            "wall_s": round(wall, 2),
            "simulated_requests_per_wall_s": round(a.num_requests / wall, 1),
            **({} if not one_process else {"cpu_s": round(cpu, 2), "requests_per_s_per_core": round(a.num_requests / cpu, 1)}),
            "simulated_s": round(m["duration"], 1),
            "num_steps": m["num_steps"],
            "total_output_tokens": m["total_output_tokens"],
            "metrics": {k: m[k] for k in ("request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms",
                                           "p99_ttft_ms", "slo_attainment", "num_preemptions", "mean_kv_usage")},
        }
    print(json.dumps({
        "benchmark": "sim_speed",
        "machine": f"{platform.machine()} x{os.cpu_count()}",
        "model": "llama-3.1-8b", "devices": a.devices, "num_requests": a.num_requests,
        "workload": wl.describe(),
        "target_wall_s": 60,
        "runs": runs,
        **({"profile_tottime_shares": profile} if profile else {}),
    }, indent=2))


def _shares(prof: cProfile.Profile, top: int = 15) -> dict[str, float]:
    """The ``top`` functions by own (tottime) share of the profiled time, in percent."""
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values()) or 1.0
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {f"{os.path.basename(f)}:{ln}({fn})": round(100 * v[2] / total, 1) for (f, ln, fn), v in rows}


if __name__ == "__main__":
    main()

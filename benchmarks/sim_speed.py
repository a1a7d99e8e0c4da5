"""How fast the simulator runs: 100,000 requests of Llama-3.1-8B on RNGD cards.

Prints JSON: wall seconds, simulated requests per wall second, simulated seconds, and the
run's serving metrics. Target (issue 4): at most 60 wall seconds on the 2-core dev machine.

    .venv/bin/python benchmarks/sim_speed.py [--num-requests 100000] [--devices npu:0,npu:1,npu:2,npu:3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    a = p.parse_args()
    cfg = SimConfig(model="llama-3.1-8b", devices=a.devices, tensor_parallel_size=8)
    wl = Workload(num_requests=a.num_requests, request_rate=a.request_rate, input_len=a.input_len,
                  output_len=a.output_len, seed=a.seed)
    runs = {}
    from furiosa_llm.api.distributed import connect

    connect("local")  # the round-robin groups run as Ray tasks: Ray's start (~20 s here) stays outside the timing
    for name, kw in (("least_loaded_1_process", {}), ("round_robin_2_ray_tasks", {"dispatch": "round_robin", "workers": 2})):
        t0 = time.perf_counter()
        res = simulate(cfg, wl, slo=SLO(ttft_ms=2000, tpot_ms=100), **kw)
        wall = time.perf_counter() - t0
        m = res.report["metrics"]
        runs[name] = {
            "wall_s": round(wall, 2),
            "simulated_requests_per_wall_s": round(a.num_requests / wall, 1),
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
    }, indent=2))


if __name__ == "__main__":
    main()

"""Simulator fidelity: calibrate on one sweep, predict a different workload, compare with the real engine.

1. `calibrate` runs the torch backend (embedded SmolLM2-135M on this machine's CPU) over a sweep
   of batch shapes and fits the cost profile.
2. A different workload (Poisson arrivals, another length mix) runs on the real engine in wall
   time and on the simulator with the calibrated profile.
3. Prints JSON: predicted and measured output throughput, median TTFT and median TPOT, and the
   relative errors (target: within 10% each).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sim_fidelity.py [--num-requests 60] [--request-rate 2.5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from furiosa_llm import EngineArgs, LLMEngine  # noqa: E402
from furiosa_llm.sim import SimConfig, Workload, simulate  # noqa: E402
from furiosa_llm.sim.calibrate import Sweep, calibrate  # noqa: E402
from furiosa_llm.sim.real import run_workload  # noqa: E402

KEYS = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "mean_ttft_ms", "mean_tpot_ms", "median_itl_ms",
        "median_e2el_ms", "duration")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cache-dir", default=os.path.join(os.path.dirname(__file__), "..", ".cache", "furiosa-llm"))
    p.add_argument("--num-requests", type=int, default=60)
    p.add_argument("--request-rate", type=float, default=2.5)
    p.add_argument("--input-len", default="lognormal:200:0.6")
    p.add_argument("--output-len", default="uniform:16:96")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--profile-out", default=None, help="Also save the calibrated profile here.")
    a = p.parse_args()

    engine = LLMEngine(EngineArgs(model=a.model, cache_dir=a.cache_dir, devices="cpu", num_kv_blocks=1024, seed=0))
    t0 = time.perf_counter()
    cost, shape = calibrate(engine)
    calib_s = time.perf_counter() - t0
    if a.profile_out:
        cost.save(a.profile_out, shape)
    wl = Workload(num_requests=a.num_requests, request_rate=a.request_rate, input_len=a.input_len,
                  output_len=a.output_len, seed=a.seed)
    real = run_workload(engine, wl).summary()
    engine.shutdown()
    # the engine's own arguments (devices, KV blocks, token budget, ...) with the calibrated profile
    sim = simulate(SimConfig.from_engine_args(engine.args, model=shape, profile=cost), wl).report["metrics"]
    rows = {k: {"measured": real[k], "predicted": sim[k], "rel_error": (sim[k] - real[k]) / real[k]} for k in KEYS}
    print(json.dumps({
        "benchmark": "sim_fidelity",
        "calibration": {"seconds": round(calib_s, 1), **cost.notes},
        "workload": wl.describe(),
        "results": rows,
        "target_abs_rel_error": 0.10,
        "within_target": {k: abs(rows[k]["rel_error"]) <= 0.10 for k in ("output_throughput", "median_ttft_ms", "median_tpot_ms")},
    }, indent=2, default=str))


if __name__ == "__main__":
    main()

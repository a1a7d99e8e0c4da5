"""Data-parallel serving: DP=2 (two engine replicas as Ray actors) against DP=1, in one run, and the simulator's prediction.

1. Calibrates a simulator profile of ONE replica with ONE torch thread (the DP=2 replica's share
   of a 2-core machine) on a small sweep.
2. Serves the same workload (``--num-prompts`` prompts of ``--input-len`` random tokens, all at
   once, ``--output-len`` tokens each, ignore_eos) through ``furiosa-llm serve`` with
   ``--data-parallel-size 1`` (one replica, torch's default threads) and ``--data-parallel-size 2``
   (one thread per replica), with vLLM's ``bench serve`` protocol (``serve_bench.run_rate``).
3. Simulates the same workload on the calibrated profile: one replica, and two replicas on the CPU
   split (``devices=cpu, data_parallel_size=2``, dispatch ``least_tokens``, the front's policy).

Prints JSON: measured throughput and latency of both, the DP=2/DP=1 ratio, the predictions.
On a machine with 2 cores the two replicas share them with the front, the HTTP server and Ray,
so expect far less than 2x; the simulator assumes each replica has its core to itself.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dp_bench.py [--num-prompts 32] [--output-len 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import run_rate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KEYS = ("duration", "request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms", "median_e2el_ms")


def _serve(model: str, cache_dir: str, dp: int, num_kv_blocks: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "furiosa_llm.entrypoints.cli", "serve", "--model", model, "--cache-dir", cache_dir,
           "--devices", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-interval", "0",
           "--num-kv-blocks", str(num_kv_blocks), "--data-parallel-size", str(dp)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server with --data-parallel-size {dp} did not start")


def _measure(a, dp: int, prompts: list[list[int]]) -> dict:
    proc, url = _serve(a.model, a.cache_dir, dp, a.num_kv_blocks)
    try:
        asyncio.run(run_rate(url, a.model, prompts[:2], 4, math.inf, a.seed))  # warm-up
        return asyncio.run(run_rate(url, a.model, prompts, a.output_len, math.inf, a.seed))
    finally:
        proc.terminate()
        proc.wait(60)


def _calibrate(a):
    import torch

    from furiosa_llm import EngineArgs, LLMEngine
    from furiosa_llm.sim.calibrate import Sweep, calibrate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = LLMEngine(EngineArgs(model=a.model, cache_dir=a.cache_dir, devices="cpu", num_kv_blocks=a.num_kv_blocks,
                                  seed=0))
    try:
        cost, shape = calibrate(engine, Sweep(batch_sizes=(1, 4, 16, 32), prompt_lens=(64, a.input_len),
                                              decode_tokens=8))
        args = engine.args
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)
    return cost, shape, args


def _predict(cost, shape, args, dp: int, a) -> dict:
    from dataclasses import replace

    from furiosa_llm.sim import SimConfig, Workload, simulate

    cfg = SimConfig.from_engine_args(replace(args, data_parallel_size=dp), model=shape, profile=cost)
    wl = Workload(num_requests=a.num_prompts, request_rate=math.inf, input_len=f"fixed:{a.input_len}",
                  output_len=f"fixed:{a.output_len}", seed=a.seed)
    m = simulate(cfg, wl, dispatch="least_tokens").report["metrics"]
    return {k: m[k] for k in KEYS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "furiosa-llm"))
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-kv-blocks", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    prompts = [rng.integers(100, 30000, size=a.input_len).tolist() for _ in range(a.num_prompts)]
    t0 = time.perf_counter()
    cost, shape, args = _calibrate(a)
    calib_s = time.perf_counter() - t0
    print(f"calibrated in {calib_s:.0f} s", file=sys.stderr)
    measured = {}
    for dp in (1, 2):
        m = _measure(a, dp, prompts)
        measured[f"dp{dp}"] = {k: m[k] for k in KEYS}
    predicted = {f"dp{dp}": _predict(cost, shape, args, dp, a) for dp in (1, 2)}
    ratio = lambda d: d["dp2"]["output_throughput"] / d["dp1"]["output_throughput"]  # noqa: E731
    print(json.dumps({
        "benchmark": "dp_bench", "model": a.model, "cpu_count": os.cpu_count(), "num_prompts": a.num_prompts,
        "input_len": a.input_len, "output_len": a.output_len, "request_rate": "inf",
        "calibration_s": round(calib_s, 1), "profile": "one replica, 1 torch thread",
        "measured": measured, "measured_dp2_over_dp1": ratio(measured),
        "predicted_1_thread_replicas": predicted, "predicted_dp2_over_dp1": ratio(predicted),
        "caveat": "dp1 runs one replica on all cores (torch default threads); dp2 runs one thread per replica; "
                  "the simulator gives each replica a core of its own and models no front, HTTP or Ray overhead",
    }, indent=2))


if __name__ == "__main__":
    main()

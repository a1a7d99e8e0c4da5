"""The simulator's predictions for RNGD from its public specifications: the README's table.

Two cases (issue 13), each in BF16 and FP8:

- Llama-3.1-8B on one card, 128 prompt / 4096 output tokens, offline (every request at t=0);
- Llama-3.1-70B on eight cards, 2048 prompt / 128 output tokens, offline.

For each, the parallel layout is the one ``furiosa-llm plan --objective offline_throughput``
finds (``furiosa_llm.sim.planner.sweep``): over the layouts the cards allow (tensor-parallel PEs
per stage, pipeline stages with ``npu_queue_limit`` = stages so the pipeline fills, data-parallel
replicas filling the rest), the one with the highest offline output throughput. Every layout's
figures are in the JSON. Every assumption the predictions rest on is printed with its value, and
each is a ``furiosa-llm simulate``/``plan`` flag.

FP8 means ``--quantization fp8`` (W8A8: 1-byte weights, FP8 matmuls at 512 TFLOPS a card) with
``--kv-cache-dtype fp8``; BF16 means ``--quantization none --kv-cache-dtype auto``.

    .venv/bin/python benchmarks/rngd_predictions.py [--markdown] [--out predictions.json]

Prints JSON (and, with ``--markdown``, the README's table). Deterministic: same figures every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from furiosa_llm.sim import SimConfig, Workload
from furiosa_llm.sim.planner import best, sweep
from furiosa_llm.sim.report import jsonable

DTYPES = {"BF16": {"quantization": "none", "kv_cache_dtype": "auto"},
          "FP8": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}
# (name, model, devices, prompt, output, requests, {pipeline stages: tensor-parallel sizes to try})
CASES = (
    ("8B, 1 card", "llama-3.1-8b", "npu:0", 128, 4096, 256, {1: [1, 2, 4, 8]}),
    ("70B, 8 cards", "llama-3.1-70b", ",".join(f"npu:{i}" for i in range(8)), 2048, 128, 256,
     {1: [8, 16, 32, 64], 2: [8, 16, 32], 4: [4, 8, 16], 8: [4, 8]}),
)
ASSUMPTIONS = ("compute_efficiency", "bandwidth_efficiency", "kv_memory_utilization", "step_overhead_s",
               "host_overhead_s", "host_s_per_seq", "link_latency_s")


def plan_layout(cfg: SimConfig, wl: Workload, layouts: dict[int, list[int]]) -> tuple[dict, list]:
    """The planner's best layout for offline serving of ``wl``, and every layout's row."""
    rows = []
    for pp, tps in layouts.items():
        c = dataclasses.replace(cfg, pipeline_parallel_size=pp, npu_queue_limit=pp)
        for r in sweep(c, wl, None, {"tensor_parallel_size": tps}, objective="offline_throughput"):
            rows.append({"tensor_parallel_size": r["point"]["tensor_parallel_size"], "pipeline_parallel_size": pp,
                         "npu_queue_limit": pp, **{k: v for k, v in r.items() if k != "point"}})
    top = best(rows, "offline_throughput")
    if top is None:
        raise RuntimeError(f"no layout runs: {rows}")
    return top, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="Multiply each case's request count (smoke runs: 0.1).")
    p.add_argument("--markdown", action="store_true", help="Also print the README table.")
    p.add_argument("--out", default=None, help="Write the JSON here too.")
    a = p.parse_args()
    t0 = time.perf_counter()
    results = []
    for name, model, devices, n_in, n_out, n_req, layouts in CASES:
        for dtype, fmt in DTYPES.items():
            cfg = SimConfig(model=model, devices=devices, **fmt)
            n = max(8, int(n_req * a.scale))
            wl = Workload(num_requests=n, input_len=f"fixed:{n_in}", output_len=f"fixed:{n_out}", seed=0)
            top, rows = plan_layout(cfg, wl, layouts)
            layout = {k: top[k] for k in ("tensor_parallel_size", "pipeline_parallel_size", "npu_queue_limit")}
            results.append({
                "case": name, "dtype": dtype, "model": model, "devices": devices, "input_len": n_in, "output_len": n_out,
                "num_requests": n, "layout": {**layout, "num_replicas": top["num_replicas"]},
                "offline": {k: top[k] for k in ("output_throughput", "request_throughput", "median_ttft_ms",
                                                "median_tpot_ms", "duration")},
                "device_time": top["device_time"], "layouts": rows,
            })
            print(f"{name} {dtype}: {layout} -> {top['output_throughput']:.0f} out tok/s", flush=True, file=sys.stderr)
    cfg0 = SimConfig()
    out = {"benchmark": "rngd_predictions", "planner_objective": "offline_throughput",
           "assumptions": {k: getattr(cfg0, k) for k in ASSUMPTIONS}, "results": results,
           "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(jsonable(out), indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(jsonable(out), f, indent=2)
    if a.markdown:
        print(markdown(out))


def markdown(out: dict) -> str:
    lines = ["| Case | Format | Best layout (plan) | Offline output tok/s | Requests/s | Median TPOT ms | Median TTFT s | "
             "Bound (compute / weights / KV) | Mean batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        lay, o, d = r["layout"], r["offline"], r["device_time"] or {}
        shares = " / ".join(f"{100 * d.get(k, 0):.0f}%" for k in
                            ("compute_bound_share", "weight_bandwidth_bound_share", "kv_bandwidth_bound_share"))
        lines.append(f"| {r['case']}, {r['input_len']} in / {r['output_len']} out | {r['dtype']} | "
                     f"TP {lay['tensor_parallel_size']} PEs x PP {lay['pipeline_parallel_size']} x DP {lay['num_replicas']} | "
                     f"{o['output_throughput']:.0f} | {o['request_throughput']:.2f} | {o['median_tpot_ms']:.1f} | "
                     f"{o['median_ttft_ms'] / 1e3:.1f} | {shares} | {d.get('mean_batch_size', 0):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

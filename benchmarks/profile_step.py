"""Where a decode step's time goes: wall time per step, device-busy time, top operations (torch.profiler).

Fills the engine with ``--batch`` running requests (random prompts of ``--prompt-len`` tokens),
times ``--steps`` whole engine steps of pure decode, then re-runs one captured decode batch
through ``ModelRunner.execute`` on the calling thread under ``torch.profiler`` (the queue's worker
thread is out of the profiler's sight). Device-busy time is the CUDA kernel time on ``cuda:N``;
on ``cpu`` the device is the host, so it is reported as None. Prints one JSON object. Not a test.

    HF_HUB_OFFLINE=1 python benchmarks/profile_step.py --batch 32 [--dtype auto] [--quantization w8a16]
    HF_HUB_OFFLINE=1 python benchmarks/profile_step.py --random-weights llama-3.1-8b --batch 8 --devices cuda:0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from furiosa_llm.api.engine_args import QUANTIZATIONS
from furiosa_llm.hal.torch_backend import DTYPES
from furiosa_llm.entrypoints.serve import int_at_least

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--random-weights", default=None, metavar="CONFIG_JSON_OR_NAME")
    ap.add_argument("--batch", type=int_at_least("--batch", 1), default=32)
    ap.add_argument("--prompt-len", type=int_at_least("--prompt-len", 1), default=35)
    ap.add_argument("--steps", type=int_at_least("--steps", 1), default=10)
    ap.add_argument("--dtype", default="auto", choices=DTYPES)
    ap.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--top", type=int_at_least("--top", 1), default=15)
    args = ap.parse_args()

    from furiosa_llm import EngineArgs, LLMEngine, SamplingParams
    from throughput import cpu_info

    model = args.model
    if args.random_weights:
        import tempfile

        from random_model import build

        out = os.path.join(tempfile.gettempdir(), "furiosa-random-" + os.path.basename(args.random_weights).replace(".json", ""))
        model = build(args.random_weights, out, cache_dir=args.cache_dir)
    ekw = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    eng = LLMEngine(EngineArgs(model=model, devices=args.devices, dtype=args.dtype, quantization=args.quantization, **ekw))
    cuda = args.devices.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(args.devices)) if cuda else (lambda: None)
    rng = random.Random(0)
    sp = SamplingParams(temperature=0.0, max_tokens=args.steps * 3 + 8, ignore_eos=True)
    for i in range(args.batch):
        eng.add_request(f"p{i}", {"prompt_token_ids": [rng.randrange(100, eng.vocab_size) for _ in range(args.prompt_len)]}, sp)
    seen: set[str] = set()
    while len(seen) < args.batch:  # prefill phase: every request has its first token
        for o in eng.step():
            seen.add(o.request_id)

    runner = eng.runner
    orig = runner.execute
    box: dict = {"t": []}

    def timed(batch):
        t = time.perf_counter()
        r = orig(batch)
        sync()
        box["t"].append(time.perf_counter() - t)
        box["b"] = batch
        return r

    runner.execute = timed
    walls = []
    for _ in range(args.steps):
        t = time.perf_counter()
        eng.step()
        sync()
        walls.append(time.perf_counter() - t)
    runner.execute = orig
    batch = box["b"]
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    orig(batch)
    sync()
    n = 5
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            orig(batch)
        sync()
    ka = prof.key_averages()
    busy = sum(e.self_device_time_total for e in ka) / n / 1e3 if cuda else None
    top = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    print(json.dumps({
        "cpu": cpu_info(), "model": model, "device": args.devices, "dtype": str(runner.dtype).replace("torch.", ""),
        "quantization": args.quantization, "batch": len(batch.sequences),
        "step_wall_ms_median": statistics.median(walls) * 1e3,
        "runner_execute_ms_median": statistics.median(box["t"]) * 1e3,
        "device_busy_ms_per_step": busy,
        "top_ops_self_cpu_ms_per_step": [{"op": e.key, "ms": e.self_cpu_time_total / n / 1e3, "calls": e.count // n}
                                         for e in top],
    }, indent=2))
    eng.shutdown()


if __name__ == "__main__":
    main()

"""JIT compilation of decode buckets on the torch backend: what it buys.

The same workload (8 requests, 100-token prompts, 96 output tokens each, greedy, EOS ignored)
runs on an engine with JIT off and on one with JIT on. With JIT on it runs twice: cold (the
buckets compile in the background while serving goes on eagerly; we report the time until the
first bucket is ready) and then warm (the buckets are compiled). Prints JSON: steady-state
decode tokens/s (decode-only steps) off and on, their ratio, the compiled-step hit rate and
compile times. Backend: FURIOSA_LLM_JIT_BACKEND (default inductor).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/jit_bench.py [--devices cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from furiosa_llm import EngineArgs, LLMEngine, SamplingParams  # noqa: E402

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cache", "furiosa-llm")


def workload(engine: LLMEngine, tag: str, n: int, prompt_len: int, out_len: int) -> dict:
    """Serve n requests at once; time the decode-only steps."""
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    for i in range(n):
        ids = [(7 * i + 13 * j) % 20000 + 100 for j in range(prompt_len)]
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    decode_s = decode_tokens = 0.0
    outputs: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        sched = engine.core.scheduler
        decode_only = not sched.waiting and all(r.num_computed_tokens >= r.num_tokens - 1 for r in sched.running)
        t = time.perf_counter()
        outs = engine.step()
        if decode_only:
            decode_s += time.perf_counter() - t
            decode_tokens += len(sched.running) + sum(1 for o in outs if o.finished)
        for o in outs:
            if o.finished:
                outputs[o.request_id] = o.outputs[0].token_ids
    return {"wall_s": time.perf_counter() - t0, "decode_tok_per_s": decode_tokens / decode_s if decode_s else 0.0,
            "outputs": outputs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="cpu")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=96)
    a = p.parse_args()
    base = dict(model="smollm2-135m-instruct", cache_dir=CACHE, devices=a.devices, num_kv_blocks=512)
    shape = (a.num_requests, a.prompt_len, a.output_len)

    off = LLMEngine(EngineArgs(**base))
    workload(off, "warm", *shape)
    r_off = workload(off, "off", *shape)
    off.shutdown()

    on = LLMEngine(EngineArgs(**base, enable_jit_compilation=True))
    t0 = time.monotonic()
    cold = workload(on, "cold", *shape)
    jit = on.core.jit
    # let the compilations that started finish (serving goes on without them meanwhile)
    deadline = time.monotonic() + 900
    while jit.compiling and time.monotonic() < deadline:
        time.sleep(1.0)
        on.core.poll_compilations()
    first_ready = None if jit.stats.first_ready_at is None else jit.stats.first_ready_at - t0
    before = jit.stats.steps_compiled
    r_on = workload(on, "on", *shape)
    stats = jit.stats.as_dict()
    on.shutdown()
    same = [r_on["outputs"][f"on-{i}"] for i in range(a.num_requests)] == [r_off["outputs"][f"off-{i}"] for i in range(a.num_requests)]
    print(json.dumps({
        "benchmark": "jit_bench",
        "backend": os.environ.get("FURIOSA_LLM_JIT_BACKEND", "inductor"),
        "device": a.devices,
        "workload": {"requests": a.num_requests, "prompt_len": a.prompt_len, "output_len": a.output_len},
        "decode_tok_per_s_jit_off": round(r_off["decode_tok_per_s"], 1),
        "decode_tok_per_s_jit_on_warm": round(r_on["decode_tok_per_s"], 1),
        "ratio_on_over_off": round(r_on["decode_tok_per_s"] / r_off["decode_tok_per_s"], 3),
        "decode_tok_per_s_jit_on_cold": round(cold["decode_tok_per_s"], 1),
        "seconds_until_first_bucket_ready": first_ready,
        "compiled_steps_in_warm_run": stats["steps_compiled"] - before,
        "greedy_outputs_equal": same,
        "jit_stats": stats,
    }, indent=2))


if __name__ == "__main__":
    main()

"""Structured outputs: throughput of 32 JSON-schema requests vs the same 32 requests unconstrained, same run.

Both batches sample at temperature 1.0 and generate exactly ``--tokens`` tokens per request (the
schema's array has at least that many items, so no constrained output completes early; the
unconstrained requests use ``ignore_eos``), so the two differ only by the grammar work: compiling
32 distinct schemas (new property names each repeat, so the compile cache never hides it), filling
each row's bitmask, applying it and advancing the matchers. The batches alternate ``--repeats``
times; medians are reported. Prints one JSON object. Not a timed test.

    HF_HUB_OFFLINE=1 python benchmarks/structured_bench.py [--requests 32] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def schema(i: int, rep: int, tokens: int) -> dict:
    """A distinct schema per request and repeat: an object with an id and a long array of small records."""
    return {"type": "object", "properties": {
        f"id_{rep}_{i}": {"type": "integer", "minimum": 0, "maximum": 10**6},
        "items": {"type": "array", "minItems": tokens, "items": {
            "type": "object", "properties": {"k": {"enum": ["a", "b", "c"]}, "v": {"type": "number", "minimum": 0,
                                                                                 "maximum": 100}},
            "required": ["k", "v"]}}},
        "required": [f"id_{rep}_{i}", "items"]}


def run(engine, jobs) -> dict:
    t0 = time.perf_counter()
    for rid, prompt, params in jobs:
        engine.add_request(rid, prompt, params)
    n_out, reasons = 0, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                c = o.outputs[0]
                n_out += len(c.token_ids)
                reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
    dt = time.perf_counter() - t0
    return {"seconds": dt, "output_tokens": n_out, "output_tokens_per_s": n_out / dt, "finish_reasons": reasons}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="xgrammar", choices=["auto", "xgrammar", "guidance"])
    ap.add_argument("--devices", default="cpu")
    args = ap.parse_args()

    from furiosa_llm import EngineArgs, LLMEngine, SamplingParams, StructuredOutputsParams

    engine = LLMEngine.from_engine_args(EngineArgs(model=args.model, devices=args.devices, seed=0,
                                                   structured_outputs_backend=args.backend))
    prompt = "Write the inventory as JSON:"
    plain = SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True)
    # warm both paths (the grammar engine's vocabulary tables are built on first use)
    run(engine, [("warm-0", prompt, plain), ("warm-1", prompt, SamplingParams(
        temperature=1.0, max_tokens=4, structured_outputs=StructuredOutputsParams(json=schema(0, -1, 1))))])
    results = {"unconstrained": [], "json_schema": []}
    for rep in range(args.repeats):
        results["unconstrained"].append(run(engine, [(f"u{rep}-{i}", prompt, plain) for i in range(args.requests)]))
        constrained = [(f"s{rep}-{i}", prompt, SamplingParams(
            temperature=1.0, max_tokens=args.tokens, structured_outputs=StructuredOutputsParams(
                json=schema(i, rep, args.tokens), disable_any_whitespace=True)))
            for i in range(args.requests)]
        results["json_schema"].append(run(engine, constrained))
    engine.shutdown()
    med = {k: statistics.median(r["output_tokens_per_s"] for r in v) for k, v in results.items()}
    print(json.dumps({
        "requests": args.requests, "tokens_per_request": args.tokens, "repeats": args.repeats,
        "backend": args.backend, "devices": args.devices,
        "unconstrained_tokens_per_s_median": round(med["unconstrained"], 1),
        "json_schema_tokens_per_s_median": round(med["json_schema"], 1),
        "overhead_pct": round(100 * (med["unconstrained"] / med["json_schema"] - 1), 1),
        "runs": results,
    }, indent=1))


if __name__ == "__main__":
    main()

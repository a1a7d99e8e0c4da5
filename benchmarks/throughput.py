"""Offline throughput: this engine vs Hugging Face ``generate`` with static batches, same run.

Workload (fixed seed): 64 requests, prompt lengths uniform in [32, 512] tokens, 128 output
tokens each with ``ignore_eos``. Prints one JSON object. Not a timed test.

    HF_HUB_OFFLINE=1 python benchmarks/throughput.py [--requests 64] [--hf-batches 8 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_engine(engine, prompts, out_len: int) -> dict:
    from furiosa_llm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{time.time_ns()}-{i}", {"prompt_token_ids": p}, params)
    n_out = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                n_out += len(o.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "output_tokens": n_out, "output_tokens_per_s": n_out / dt}


def engine_single_decode(engine, prompt, out_len: int) -> float:
    from furiosa_llm import SamplingParams

    engine.add_request(f"single-{time.time_ns()}", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
    first = last = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            now = time.perf_counter()
            first = first or now
            last = now
    return (out_len - 1) / (last - first)


def hf_generate(model, batch: list[list[int]], out_len: int, pad_id: int) -> int:
    from transformers import GenerationConfig

    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    cfg = GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                           eos_token_id=None, pad_token_id=pad_id)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, generation_config=cfg)
    return (out.shape[1] - width) * len(batch)


def run_hf(model, prompts, out_len: int, batch_size: int, pad_id: int) -> dict:
    t0 = time.perf_counter()
    n_out = sum(hf_generate(model, prompts[i : i + batch_size], out_len, pad_id) for i in range(0, len(prompts), batch_size))
    dt = time.perf_counter() - t0
    return {"batch_size": batch_size, "seconds": dt, "output_tokens": n_out, "output_tokens_per_s": n_out / dt}


def hf_single_decode(model, prompt, out_len: int, pad_id: int) -> float:
    t0 = time.perf_counter()
    hf_generate(model, [prompt], 1, pad_id)
    t1 = time.perf_counter()
    hf_generate(model, [prompt], out_len, pad_id)
    t2 = time.perf_counter()
    return (out_len - 1) / ((t2 - t1) - (t1 - t0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    from furiosa_llm import EngineArgs, LLMEngine

    ekw = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    engine = LLMEngine(EngineArgs(model=args.model, devices=args.devices, seed=args.seed, **ekw))
    prompts = workload(args.requests, args.min_prompt, args.max_prompt, engine.vocab_size, args.seed)
    single_prompt = prompts[0][: args.min_prompt]

    run_engine(engine, prompts[:2], 4)  # warm-up
    ours = run_engine(engine, prompts, args.output_len)
    ours_single = statistics.median(engine_single_decode(engine, single_prompt, args.output_len) for _ in range(3))

    hf_model = engine.runner.model  # the very same weights, run by transformers
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    hf_runs = [run_hf(hf_model, prompts, args.output_len, b, pad) for b in args.hf_batches]
    best = max(hf_runs, key=lambda r: r["output_tokens_per_s"])
    hf_single = statistics.median(hf_single_decode(hf_model, single_prompt, args.output_len, pad) for _ in range(3))

    print(json.dumps({
        "workload": {"requests": args.requests, "prompt_len": [args.min_prompt, args.max_prompt],
                     "output_len": args.output_len, "seed": args.seed, "device": args.devices,
                     "torch_threads": torch.get_num_threads()},
        "engine": ours,
        "hf_generate": hf_runs,
        "throughput_ratio_vs_best_hf": ours["output_tokens_per_s"] / best["output_tokens_per_s"],
        "single_request_decode_tokens_per_s": {"engine": ours_single, "hf_generate": hf_single,
                                                "ratio": ours_single / hf_single},
    }, indent=2))


if __name__ == "__main__":
    main()

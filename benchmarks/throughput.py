"""Offline throughput: this engine vs Hugging Face ``generate`` (and llama.cpp), same run.

Two workloads, fixed seeds, 128 output tokens per request with ``ignore_eos``:

- ``random`` (default): 64 requests, prompt lengths uniform in [32, 512] tokens; Hugging Face
  in static batches (``--hf-batches``), inputs on the model's device.
- ``anchor``: for each ``--concurrency`` C, C requests at once cycling eight ~35-token English
  prompts; Hugging Face ``generate`` on the same C prompts in one batch (``--hf-dtype``, float32
  on cpu by default), and llama.cpp on the same token ids and the same GGUF when it can be run
  (``llama_cpp`` importable here, or ``--llama-python`` / ``$FURIOSA_LLAMA_CPP_PYTHON`` naming a
  Python that has it); the JSON says when it could not.

``--random-weights CONFIG`` builds a random-weight model of a real configuration locally
(``benchmarks/random_model.py``) and measures that. ``--variants`` lists engine settings
``DTYPE[+QUANTIZATION]`` measured one after another (default: ``--dtype``/``--quantization``);
on the anchor workload ``--rounds N`` repeats every variant and Hugging Face N times, interleaved,
and reports each one's median round (the machine's load then falls on all of them alike).
Prints one JSON object with the CPU model and flags. Not a timed test.

    HF_HUB_OFFLINE=1 python benchmarks/throughput.py [--requests 64] [--hf-batches 8 32]
    HF_HUB_OFFLINE=1 python benchmarks/throughput.py --workload anchor --concurrency 1 32 \
        --variants auto auto+w8a16 --llama-python /path/to/venv/bin/python
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

from furiosa_llm.api.engine_args import QUANTIZATIONS
from furiosa_llm.hal.torch_backend import DTYPES
from furiosa_llm.entrypoints.serve import int_at_least


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


ANCHOR_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle washed up on the rocks after a long winter storm.",
    "Explain in simple words how a refrigerator keeps food cold, and why the back of it feels warm when you touch it.",
    "List five practical tips for a student who wants to learn a new language faster while living in a small town.",
    "Describe the water cycle to a ten year old child, using an example of a rainy afternoon in a busy city park.",
    "What are the main differences between a bicycle and a motorcycle, and when would you choose one over the other?",
    "Summarize the plot of a detective novel in which the butler is innocent but the gardener hides an important secret.",
    "Give a recipe for a simple vegetable soup that a beginner can cook in thirty minutes with ingredients from a market.",
    "Write a friendly letter to a neighbour asking them to water your plants while you travel abroad for two weeks.",
]


def cpu_info() -> dict:
    """The CPU model and the flags that matter for these kernels (they differ between machines)."""
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    keep = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")
    return {"model": model, "flags": [f for f in keep if f in flags], "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": os.getloadavg()}


def hf_generate(model, batch: list[list[int]], out_len: int, pad_id: int) -> int:
    from transformers import GenerationConfig

    dev = next(model.parameters()).device
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=dev)
    cfg = GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                           eos_token_id=None, pad_token_id=pad_id)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, generation_config=cfg)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
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


def run_llama_cpp(python: str | None, gguf: str | None, prompts, out_len: int, threads: int, repeats: int) -> dict:
    """llama.cpp on the same prompts (``benchmarks/llama_cpp_run.py`` in ``python``), or why it was not run."""
    import subprocess
    import sys

    if gguf is None:
        return {"skipped": "the model has no GGUF file (random weights or a Hugging Face folder)"}
    if python is None:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            return {"skipped": "llama_cpp is not importable here and no --llama-python / $FURIOSA_LLAMA_CPP_PYTHON was given"}
        python = sys.executable
    job = {"gguf": gguf, "prompts": prompts, "output_len": out_len, "threads": threads, "repeats": repeats}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_cpp_run.py")
    proc = subprocess.run([python, script], input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"llama.cpp run failed: {proc.stderr.strip()[-400:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_variant(v: str) -> tuple[str, str]:
    """``DTYPE`` or ``DTYPE+QUANT`` as (dtype, quantization); a ``ValueError`` for an empty part."""
    dtype, plus, quant = v.partition("+")
    quant = quant if plus else "none"
    if dtype not in DTYPES or quant not in QUANTIZATIONS:
        raise ValueError(f"{v!r}: expected DTYPE or DTYPE+QUANT (DTYPE one of {', '.join(DTYPES)}; QUANT one of "
                         f"{', '.join(QUANTIZATIONS)}), e.g. auto or auto+w8a16")
    return dtype, quant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--random-weights", default=None, metavar="CONFIG_JSON_OR_NAME",
                    help="measure a random-weight model of this configuration (built locally; see random_model.py)")
    ap.add_argument("--workload", choices=["random", "anchor"], default="random")
    ap.add_argument("--requests", type=int_at_least("--requests", 1), default=64)
    ap.add_argument("--min-prompt", type=int_at_least("--min-prompt", 1), default=32)
    ap.add_argument("--max-prompt", type=int_at_least("--max-prompt", 1), default=512)
    ap.add_argument("--output-len", type=int_at_least("--output-len", 2), default=128,
                    help="new tokens per request (>= 2: decode speed is timed between the first and the last)")
    ap.add_argument("--hf-batches", type=int_at_least("--hf-batches", 1), nargs="+", default=[8, 32])
    ap.add_argument("--concurrency", type=int_at_least("--concurrency", 1), nargs="+", default=[1, 32], help="anchor workload: concurrent requests")
    ap.add_argument("--dtype", default="auto", choices=DTYPES)
    ap.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    ap.add_argument("--variants", nargs="+", default=None, metavar="DTYPE[+QUANT]",
                    help="engine settings measured one after another, e.g. auto auto+w8a16 float32")
    ap.add_argument("--hf-dtype", default=None, help="Hugging Face baseline dtype (default float32 on cpu, the engine's on cuda)")
    ap.add_argument("--llama-python", default=os.environ.get("FURIOSA_LLAMA_CPP_PYTHON"),
                    help="a Python with llama_cpp (llama-cpp-python), when this one lacks it")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--rounds", type=int_at_least("--rounds", 1), default=1,
                    help="anchor workload: measure every variant and Hugging Face this many times, interleaved; medians")
    ap.add_argument("--seed", type=int_at_least("--seed", 0), default=0)
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--max-num-seqs", type=int_at_least("--max-num-seqs", 1), default=None,
                    help="the engine's max_processing_samples (running requests; on cuda also the largest CUDA graph)")
    ap.add_argument("--enforce-eager", action="store_true", help="the engine without CUDA graphs (cuda)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    if args.min_prompt > args.max_prompt:
        ap.error(f"--min-prompt {args.min_prompt} is above --max-prompt {args.max_prompt}")
    for v in args.variants or []:
        try:
            parse_variant(v)
        except ValueError as e:
            ap.error(f"--variants: {e}")
    torch.manual_seed(args.seed)

    from furiosa_llm import EngineArgs, LLMEngine
    from furiosa_llm.hal.torch_backend import resolve_dtype
    from furiosa_llm.model.loader import load_model_and_tokenizer, resolve_model

    ekw: dict = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    ekw.update(max_processing_samples=args.max_num_seqs, enforce_eager=args.enforce_eager)
    model = args.model
    if args.random_weights:
        import tempfile

        from random_model import build

        out = os.path.join(tempfile.gettempdir(), "furiosa-random-" + os.path.basename(args.random_weights).replace(".json", ""))
        model = build(args.random_weights, out, cache_dir=args.cache_dir)
    src = resolve_model(model)
    gguf = str(src.path) if src.is_gguf else None
    variants = [parse_variant(v) for v in args.variants] if args.variants else [(args.dtype, args.quantization)]
    report: dict = {"cpu": cpu_info(), "model": model, "random_weights": args.random_weights,
                    "workload": {"kind": args.workload, "output_len": args.output_len, "seed": args.seed,
                                 "device": args.devices},
                    "engine_args": {"max_num_seqs": args.max_num_seqs, "enforce_eager": args.enforce_eager}, "engine": {}}
    tok = None
    if args.workload == "anchor":
        from transformers import AutoTokenizer

        tok_src = src.path.parent if src.is_gguf else src.path
        tok = (AutoTokenizer.from_pretrained(tok_src, gguf_file=src.path.name) if src.is_gguf
               else AutoTokenizer.from_pretrained(tok_src))
        base = [tok(p).input_ids for p in ANCHOR_PROMPTS]
        report["workload"].update(prompt_tokens=[len(p) for p in base], concurrency=args.concurrency)
    if args.workload == "anchor":
        report["workload"]["rounds"] = args.rounds
        anchor_rounds(report, args, variants, base, model, ekw, src)
    for dtype, quant in variants if args.workload != "anchor" else []:
        name = dtype if quant == "none" else f"{dtype}+{quant}"
        t0 = time.perf_counter()
        engine = LLMEngine(EngineArgs(model=model, devices=args.devices, seed=args.seed, dtype=dtype,
                                      quantization=quant, **ekw))
        entry: dict = {"dtype": str(engine.runner.dtype).replace("torch.", ""), "quantization": quant,
                       "start_seconds": round(time.perf_counter() - t0, 1), "decode_path": decode_path(engine)}
        prompts = workload(args.requests, args.min_prompt, args.max_prompt, engine.vocab_size, args.seed)
        run_engine(engine, prompts[:2], 4)  # warm-up
        entry["throughput"] = run_engine(engine, prompts, args.output_len)
        entry["single_request_decode_tokens_per_s"] = statistics.median(
            engine_single_decode(engine, prompts[0][: args.min_prompt], args.output_len) for _ in range(3))
        report["engine"][name] = entry
        engine.shutdown()
        del engine

    if not args.no_hf and args.workload != "anchor":
        hf_dtype = args.hf_dtype or ("float32" if args.devices == "cpu" else str(resolve_dtype(args.dtype, args.devices)).replace("torch.", ""))
        hf_model, hf_tok, _ = load_model_and_tokenizer(src, cache_dir=args.cache_dir or EngineArgs(model=model).cache_dir,
                                                       dtype=getattr(torch, hf_dtype))
        hf_model = hf_model.to(args.devices)
        pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else 0
        hf: dict = {"dtype": hf_dtype}
        hf_generate(hf_model, [[100] * 8], 2, pad)  # warm-up
        prompts = workload(args.requests, args.min_prompt, args.max_prompt, hf_model.config.vocab_size, args.seed)
        hf["batches"] = [run_hf(hf_model, prompts, args.output_len, b, pad) for b in args.hf_batches]
        hf["single_request_decode_tokens_per_s"] = statistics.median(
            hf_single_decode(hf_model, prompts[0][: args.min_prompt], args.output_len, pad) for _ in range(3))
        report["hf_generate"] = hf
        del hf_model

    if args.workload == "anchor":
        threads = torch.get_num_threads()
        llama = {f"c{c}": run_llama_cpp(args.llama_python, gguf, [base[i % len(base)] for i in range(c)],
                                        args.output_len, threads, 1) for c in args.concurrency}
        report["llama_cpp"] = llama

    report["ratios"] = ratios(report, args)
    print(json.dumps(report, indent=2))


def decode_path(engine) -> str:
    """How the engine's decode steps attend: ``gather``, ``paged`` or ``paged+cuda_graphs`` (see ``model.paged_decode``)."""
    paged = engine.runner.paged
    return "gather" if paged is None else "paged+cuda_graphs" if paged.graphs else "paged"


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle of an even count), with every round's tokens/s."""
    ordered = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    return dict(ordered[(len(ordered) - 1) // 2], rounds_tokens_per_s=[r["output_tokens_per_s"] for r in runs])


def anchor_rounds(report: dict, args, variants, base, model, ekw, src) -> None:
    """The anchor workload, ``--rounds`` times over: each round runs every engine variant, then
    Hugging Face, one after another, so a shared machine's load falls on all of them alike. Each
    figure is the median round's; ``rounds_tokens_per_s`` lists them all."""
    from furiosa_llm import EngineArgs, LLMEngine
    from furiosa_llm.hal.torch_backend import resolve_dtype
    from furiosa_llm.model.loader import load_model_and_tokenizer

    runs: dict = {}
    hf_model = None
    if not args.no_hf:
        hf_dtype = args.hf_dtype or ("float32" if args.devices == "cpu" else str(resolve_dtype(args.dtype, args.devices)).replace("torch.", ""))
        hf_model, hf_tok, _ = load_model_and_tokenizer(src, cache_dir=args.cache_dir or EngineArgs(model=model).cache_dir,
                                                       dtype=getattr(torch, hf_dtype))
        hf_model = hf_model.to(args.devices)
        pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else 0
        hf_generate(hf_model, [[100] * 8], 2, pad)  # warm-up
    for _ in range(args.rounds):
        for dtype, quant in variants:
            name = dtype if quant == "none" else f"{dtype}+{quant}"
            engine = LLMEngine(EngineArgs(model=model, devices=args.devices, seed=args.seed, dtype=dtype,
                                          quantization=quant, **ekw))
            report["engine"].setdefault(name, {"dtype": str(engine.runner.dtype).replace("torch.", ""), "quantization": quant,
                                               "decode_path": decode_path(engine)})
            run_engine(engine, base[:2], 4)  # warm-up
            for c in args.concurrency:
                prompts = [base[i % len(base)] for i in range(c)]
                runs.setdefault((name, c), []).append(run_engine(engine, prompts, args.output_len))
            engine.shutdown()
            del engine
        if hf_model is not None:
            for c in args.concurrency:
                prompts = [base[i % len(base)] for i in range(c)]
                runs.setdefault(("hf", c), []).append(run_hf(hf_model, prompts, args.output_len, c, pad))
    for (name, c), rs in runs.items():
        if name != "hf":
            report["engine"][name][f"c{c}"] = _median_run(rs)
    if hf_model is not None:
        report["hf_generate"] = {"dtype": hf_dtype, **{f"c{c}": _median_run(runs[("hf", c)]) for c in args.concurrency}}
    report["load_average_after"] = list(os.getloadavg())


def ratios(report: dict, args) -> dict:
    """Engine tokens/s over each baseline's, per variant (and per concurrency on the anchor workload)."""
    out: dict = {}
    hf = report.get("hf_generate")
    llama = report.get("llama_cpp", {})
    for name, e in report["engine"].items():
        r: dict = {}
        if args.workload == "anchor":
            for c in args.concurrency:
                ours = e[f"c{c}"]["output_tokens_per_s"]
                if hf:
                    r[f"c{c}_vs_hf"] = ours / hf[f"c{c}"]["output_tokens_per_s"]
                if "output_tokens_per_s" in llama.get(f"c{c}", {}):
                    r[f"c{c}_vs_llama_cpp"] = ours / llama[f"c{c}"]["output_tokens_per_s"]
        elif hf:
            best = max(b["output_tokens_per_s"] for b in hf["batches"])
            r["throughput_vs_best_hf"] = e["throughput"]["output_tokens_per_s"] / best
            r["single_decode_vs_hf"] = e["single_request_decode_tokens_per_s"] / hf["single_request_decode_tokens_per_s"]
        out[name] = r
    return out


if __name__ == "__main__":
    main()

"""Serving benchmark: vLLM's `bench serve` protocol against `furiosa-llm serve`.

Streams completions with usage (`stream_options.include_usage`) at several Poisson request
rates and reports, per rate, vLLM's serving metrics as JSON: TTFT, TPOT, ITL and end-to-end
latency (mean, median, p90, p99 in ms), request and token throughput.

Starts a server on the embedded model unless --base-url points at a running one:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve_bench.py [--rates 1,2,4,inf] [--num-prompts 32]
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

import httpx
import numpy as np

from furiosa_llm.sim.metrics import latency_stats

REPO = Path(__file__).resolve().parent.parent


async def _request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
    return {"sent": sent, "times": times, "input": len(prompt), "output": usage["completion_tokens"] if usage else len(times)}


async def run_rate(base_url: str, model: str, prompts: list[list[int]], max_tokens: int, rate: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    gaps = np.zeros(len(prompts)) if math.isinf(rate) else rng.exponential(1.0 / rate, size=len(prompts))
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for p, gap in zip(prompts, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(_request(client, model, p, max_tokens)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ttft = np.array([(r["times"][0] - r["sent"]) * 1e3 for r in results if r["times"]])
    e2el = np.array([(r["times"][-1] - r["sent"]) * 1e3 for r in results if r["times"]])
    tpot = np.array([(r["times"][-1] - r["times"][0]) * 1e3 / (r["output"] - 1) for r in results if r["output"] > 1 and r["times"]])
    itl = np.concatenate([np.diff(r["times"]) * 1e3 for r in results if len(r["times"]) > 1] or [np.zeros(0)])
    n_in, n_out = sum(r["input"] for r in results), sum(r["output"] for r in results)
    out = {"request_rate": None if math.isinf(rate) else rate, "completed": len(results), "duration": duration,
           "total_input_tokens": n_in, "total_output_tokens": n_out,
           "request_throughput": len(results) / duration, "output_throughput": n_out / duration,
           "total_token_throughput": (n_in + n_out) / duration}
    for name, vals in (("ttft", ttft), ("tpot", tpot), ("itl", np.sort(itl)), ("e2el", e2el)):
        out.update(latency_stats(name, vals))
    return out


def _start_server(model: str, cache_dir: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "furiosa_llm.entrypoints.cli", "serve", "--model", model, "--cache-dir", cache_dir,
           "--devices", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-interval", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="A running server; default: start one on the embedded model.")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "furiosa-llm"))
    p.add_argument("--rates", default="1,2,4,inf", help="Comma-separated request rates (req/s); inf sends all at once.")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    proc = None
    base_url = a.base_url
    if base_url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = _start_server(a.model, a.cache_dir, port)
        base_url = f"http://127.0.0.1:{port}"
    try:
        rng = np.random.default_rng(a.seed)
        vocab = httpx.get(f"{base_url}/v1/models").json()  # reachable
        del vocab
        prompts = [rng.integers(100, 30000, size=a.input_len).tolist() for _ in range(a.num_prompts)]
        asyncio.run(run_rate(base_url, a.model, prompts[:2], 4, math.inf, a.seed))  # warm-up
        results = [asyncio.run(run_rate(base_url, a.model, prompts, a.output_len, float(r), a.seed))
                   for r in a.rates.split(",")]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(json.dumps({"benchmark": "serve_bench", "backend": "openai-completions (vLLM bench serve protocol)",
                      "model": a.model, "num_prompts": a.num_prompts, "input_len": a.input_len,
                      "output_len": a.output_len, "results": results}, indent=2))


if __name__ == "__main__":
    main()

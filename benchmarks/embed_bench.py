"""Embedding benchmark: embeddings per second through the engine vs plain ``transformers``, same model, same run.

For N sentences of varied length (seeded; word counts log-normal, median ~14 words, 3 to 200), it
measures, interleaved over ``--repeats`` rounds (each round runs the three paths one after the other; the
median is reported):

- ``transformers``: plain batched inference, the usual loop — the fast tokenizer on ``--hf-batch-size``
  sentences at a time (padding to the batch's longest), ``AutoModel`` under ``torch.inference_mode``,
  mean pooling over the attention mask, L2 normalisation (what sentence-transformers' card shows);
- ``transformers_length_sorted``: the same, batches formed in order of length (as sentence-transformers'
  ``encode`` does), so little padding: the stronger baseline;
- ``engine``: ``LLM.embed(sentences)`` — every sentence a pooling request through the engine core
  (scheduler, token budget ``--max-num-batched-tokens``), the packed encoder forward of the pooling runner;
- ``server`` (unless ``--no-server``): ``furiosa-llm serve`` in a subprocess, the sentences posted to
  ``/v1/embeddings`` as ``--server-concurrency`` concurrent requests of ``--server-batch`` inputs each.

It checks that every engine vector matches the transformers one (cosine >= 0.9999) and prints JSON:
sentences/s for each path, the ratios engine/transformers and server/transformers, token counts,
and torch's thread count. Timings on a shared machine are noisy: compare the ratios of one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed_bench.py [--num-sentences 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODEL = "all-minilm-l6-v2"
WORDS = (
    "the of and to in is was for on that with as by at from it be this are an or which his her their new "
    "first time year people city world system data model network language water energy music history school "
    "river mountain company government market research team game film book song house car road station bank "
    "light power field number group state country family student teacher computer software science art war "
    "church island village club league season album series band record player election party minister court "
    "quickly slowly carefully large small ancient modern famous important different early late several many "
    "built played wrote found became used made known called located described released opened developed"
).split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of seeded random words; word counts log-normal (median 14), clipped to [3, 200]."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(mean=np.log(14), sigma=0.7, size=n)), 3, 200).astype(int)
    out = []
    for k in lengths:
        words = rng.choice(WORDS, size=k)
        out.append(" ".join(words).capitalize() + ".")
    return out


def hf_embed(model, tok, sentences: list[str], batch_size: int, sort_by_length: bool = False):
    """Embeddings ``[N, hidden]`` from plain batched ``transformers`` inference, in the order of ``sentences``.

    ``sort_by_length``: batch the sentences in order of length (what sentence-transformers' ``encode`` does,
    so each batch pads little), then put the vectors back in order.
    """
    import torch

    if sort_by_length:
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = hf_embed(model, tok, [sentences[i] for i in order], batch_size)
        return out[torch.argsort(torch.tensor(order))]
    vecs = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            enc = tok(sentences[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            vecs.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(vecs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "furiosa_llm.entrypoints.cli", "serve", "--model", MODEL, "--devices", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--log-interval", "0",
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start in 180 s")


async def server_embed(base_url: str, sentences: list[str], batch: int, concurrency: int) -> list[list[float]]:
    chunks = [sentences[i:i + batch] for i in range(0, len(sentences), batch)]
    results: list = [None] * len(chunks)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def one(i: int, chunk: list[str]) -> None:
            async with sem:
                r = await client.post("/v1/embeddings", json={"model": MODEL, "input": chunk, "encoding_format": "float"})
                r.raise_for_status()
                results[i] = [d["embedding"] for d in r.json()["data"]]

        await asyncio.gather(*(one(i, c) for i, c in enumerate(chunks)))
    return [v for chunk in results for v in chunk]


def min_cosine(a, b) -> float:
    import torch

    a = torch.nn.functional.normalize(torch.as_tensor(a, dtype=torch.float32), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(b, dtype=torch.float32), dim=-1)
    return float((a * b).sum(-1).min())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-sentences", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="Rounds of each path, interleaved; the median is reported.")
    p.add_argument("--hf-batch-size", type=int, default=32, help="Batch size of the transformers baseline.")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="The engine's token budget per step.")
    p.add_argument("--no-server", action="store_true", help="Skip the server path.")
    p.add_argument("--server-batch", type=int, default=32, help="Inputs per /v1/embeddings request.")
    p.add_argument("--server-concurrency", type=int, default=8, help="Requests in flight at once.")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import torch
    from transformers import AutoModel, AutoTokenizer

    from furiosa_llm import LLM
    from furiosa_llm.model.loader import resolve_model

    sentences = make_sentences(a.num_sentences, a.seed)
    folder = resolve_model(MODEL).path
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModel.from_pretrained(folder).eval()
    llm = LLM(MODEL, devices="cpu", max_num_batched_tokens=a.max_num_batched_tokens)
    num_tokens = sum(len(ids) for ids in tok(sentences)["input_ids"])
    hf_embed(hf, tok, sentences[:64], a.hf_batch_size)  # warm-up
    llm.embed(sentences[:64])

    proc = base = None
    if not a.no_server:  # started first, so that its rounds interleave with the others (same load on the machine)
        port = _free_port()
        proc = start_server(a, port)
        base = f"http://127.0.0.1:{port}"
    times: dict[str, list[float]] = {"transformers": [], "transformers_length_sorted": [], "engine": [],
                                     **({} if proc is None else {"server": []})}
    ref = got = vecs = None
    try:
        if proc is not None:
            asyncio.run(server_embed(base, sentences[:64], a.server_batch, a.server_concurrency))  # warm-up
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            ref = hf_embed(hf, tok, sentences, a.hf_batch_size)
            times["transformers"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hf_embed(hf, tok, sentences, a.hf_batch_size, sort_by_length=True)
            times["transformers_length_sorted"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = [o.outputs.embedding for o in llm.embed(sentences)]
            times["engine"].append(time.perf_counter() - t0)
            if proc is not None:
                t0 = time.perf_counter()
                vecs = asyncio.run(server_embed(base, sentences, a.server_batch, a.server_concurrency))
                times["server"].append(time.perf_counter() - t0)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        llm.shutdown()
    engine_cos = min_cosine(got, ref)
    server_cos = None if vecs is None else min_cosine(vecs, ref)

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: a.num_sentences / v for k, v in med.items()}
    out = {
        "benchmark": "embed_bench", "model": MODEL, "num_sentences": a.num_sentences, "num_tokens": num_tokens,
        "mean_tokens_per_sentence": num_tokens / a.num_sentences, "repeats": a.repeats,
        "hf_batch_size": a.hf_batch_size, "max_num_batched_tokens": a.max_num_batched_tokens,
        "torch_num_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "embeddings_per_s": {k: round(v, 1) for k, v in rate.items()},
        "speedup_engine_vs_transformers": round(rate["engine"] / rate["transformers"], 3),
        "speedup_engine_vs_transformers_length_sorted": round(rate["engine"] / rate["transformers_length_sorted"], 3),
        "min_cosine_engine_vs_transformers": round(engine_cos, 6),
    }
    if "server" in rate:
        out.update({"server_batch": a.server_batch, "server_concurrency": a.server_concurrency,
                    "speedup_server_vs_transformers": round(rate["server"] / rate["transformers"], 3),
                    "min_cosine_server_vs_transformers": round(server_cos, 6)})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""llama.cpp greedy decode of N concurrent sequences (llama-cpp-python's low-level API), as JSON.

Run by ``benchmarks/throughput.py`` in whatever Python has ``llama_cpp`` (its own virtual
environment is fine: llama-cpp-python built from source with ``CMAKE_ARGS=-DGGML_NATIVE=ON``).
Reads one JSON object on stdin: ``{"gguf": path, "prompts": [[ids...], ...], "output_len": n,
"threads": t, "repeats": r}``; every prompt is one sequence, all decoded together in one
``llama_batch`` per step (one token per sequence, greedy argmax of its logits). Prints
``{"output_tokens_per_s": ..., "seconds": ..., "output_tokens": ..., "version": ...}`` (the
median of ``repeats`` runs). Not a test.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import llama_cpp as L
import numpy as np


def _fn(*names):
    for n in names:
        if hasattr(L, n):
            return getattr(L, n)
    raise AttributeError(f"llama_cpp has none of {names}")


def main() -> None:
    job = json.load(sys.stdin)
    prompts, out_len, threads = job["prompts"], int(job["output_len"]), int(job["threads"])
    n = len(prompts)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = _fn("llama_model_load_from_file", "llama_load_model_from_file")(job["gguf"].encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = _fn("llama_vocab_n_tokens", "llama_n_vocab")(vocab)
    cp = L.llama_context_default_params()
    per_seq = max(len(p) for p in prompts) + out_len + 8
    cp.n_ctx = per_seq * n
    cp.n_batch = max(512, sum(len(p) for p in prompts))
    cp.n_ubatch = min(cp.n_batch, 512)
    cp.n_seq_max = n
    cp.n_threads = cp.n_threads_batch = threads
    ctx = _fn("llama_init_from_model", "llama_new_context_with_model")(model, cp)
    batch = L.llama_batch_init(cp.n_batch, 0, n)
    mem_clear = None
    if hasattr(L, "llama_get_memory") and hasattr(L, "llama_memory_clear"):
        mem_clear = lambda: L.llama_memory_clear(L.llama_get_memory(ctx), True)  # noqa: E731
    elif hasattr(L, "llama_kv_self_clear"):
        mem_clear = lambda: L.llama_kv_self_clear(ctx)  # noqa: E731
    else:
        mem_clear = lambda: L.llama_kv_cache_clear(ctx)  # noqa: E731

    def fill(entries):  # entries: (token, pos, seq, want_logits)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
        batch.n_tokens = len(entries)
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    def run() -> tuple[float, int]:
        mem_clear()
        t0 = time.perf_counter()
        entries = [(tok, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, tok in enumerate(p)]
        fill(entries)  # prefill: every prompt in one batch (n_batch holds them all)
        last = [k for k, e in enumerate(entries) if e[3]]
        nxt = [argmax(k) for k in last]
        pos = [len(p) for p in prompts]
        produced = n
        for _ in range(out_len - 1):
            fill([(nxt[s], pos[s], s, True) for s in range(n)])
            nxt = [argmax(s) for s in range(n)]
            pos = [q + 1 for q in pos]
            produced += n
        return time.perf_counter() - t0, produced

    run_times = [run() for _ in range(int(job.get("repeats", 1)))]
    secs = statistics.median(t for t, _ in run_times)
    toks = run_times[0][1]
    print(json.dumps({"output_tokens_per_s": toks / secs, "seconds": secs, "output_tokens": toks,
                      "threads": threads, "version": getattr(L, "__version__", "?")}))


if __name__ == "__main__":
    main()

"""The in-place paged decode path (``model.paged_decode``) computes what the gather path computes.

On CPU the path runs eager ``flex_attention`` (its dense reference semantics, through the
``physical_to_logical`` mask); on CUDA the same block mask drives the compiled Triton kernel and
CUDA graphs (checked there with ``../shared/gpu`` scripts, not in CI).
"""

import pytest
import torch

from furiosa_llm.hal import Batch, SamplingSettings, SequenceChunk
from furiosa_llm.model.paged_decode import capture_sizes
from furiosa_llm.model.runner import ModelRunner


def tiny_llama(heads: int, kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=16 * heads, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def runner(model, mode: str, monkeypatch) -> ModelRunner:
    monkeypatch.setenv("FURIOSA_LLM_DECODE_ATTENTION", mode)
    return ModelRunner(model, "cpu", num_blocks=24, block_size=4, max_model_len=64, decode_batch_sizes=[1, 2, 4])


def greedy_run(r: ModelRunner, prompts, tables, steps: int) -> list[list[int]]:
    """Prefill ``prompts`` in one step, then ``steps`` greedy decode steps; tokens of each request."""
    greedy = SamplingSettings(temperature=0.0)
    chunks = [SequenceChunk(f"r{i}", list(p), 0, t, True, greedy) for i, (p, t) in enumerate(zip(prompts, tables))]
    res = r.execute(Batch(0, chunks))
    out = [[res.sampled[c.request_id]] for c in chunks]
    lens = [len(p) for p in prompts]
    for step in range(1, steps + 1):
        rows = [SequenceChunk(f"r{i}", [out[i][-1]], lens[i] + step - 1, tables[i], True, greedy)
                for i in range(len(prompts))]
        res = r.execute(Batch(step, rows))
        for i in range(len(prompts)):
            out[i].append(res.sampled[f"r{i}"])
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (2, 2)])
def test_paged_decode_matches_gather(heads, kv_heads, monkeypatch):
    model = tiny_llama(heads, kv_heads)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [5, 6, 7, 8, 40]]
    # scattered, out-of-order blocks; the first block is shared by requests 0 and 2 (a cached prefix)
    tables = [[3, 17, 9, 21, 2], [11, 4, 0, 6, 14], [3, 8, 19, 1, 23]]
    gather = runner(model, "gather", monkeypatch)
    assert gather.paged is None
    want = greedy_run(gather, prompts, tables, 12)
    paged = runner(model, "paged", monkeypatch)
    calls = []
    run = paged.paged.run
    paged.paged.run = lambda seqs: calls.append(len(seqs)) or run(seqs)
    got = greedy_run(paged, prompts, tables, 12)
    assert calls == [3] * 12  # every decode step took the paged path, padded to 4 rows
    assert got == want


def test_paged_decode_reads_only_its_own_blocks(monkeypatch):
    """Stale K/V in a reused block past a row's context, and other rows' blocks, are never attended."""
    model = tiny_llama(4, 2)
    r = runner(model, "paged", monkeypatch)
    greedy = SamplingSettings(temperature=0.0)
    prompt = [5, 6, 7, 8, 9, 10]
    # fill block 5 (and 6) with another request's K/V, then run a request whose last block is 5
    r.execute(Batch(0, [SequenceChunk("old", list(range(20, 28)), 0, [6, 5], True, greedy)]))
    alone = ModelRunner(model, "cpu", num_blocks=24, block_size=4, max_model_len=64, decode_batch_sizes=[1, 2, 4])
    first = r.execute(Batch(1, [SequenceChunk("a", prompt, 0, [7, 5], True, greedy)])).sampled["a"]
    ref = alone.execute(Batch(1, [SequenceChunk("a", prompt, 0, [7, 5], True, greedy)])).sampled["a"]
    assert first == ref
    a = r.execute(Batch(2, [SequenceChunk("a", [first], 6, [7, 5], True, greedy)]))
    b = alone.execute(Batch(2, [SequenceChunk("a", [first], 6, [7, 5], True, greedy)]))
    assert a.sampled == b.sampled


def test_capture_sizes():
    assert capture_sizes((1, 2, 4, 8, 16), 6) == [1, 2, 4, 6]
    assert capture_sizes((1, 2, 4, 8, 16), 8) == [1, 2, 4, 8]
    assert capture_sizes((1, 2, 4, 8, 16), 65536) == [1, 2, 4, 8, 16]


def test_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv("FURIOSA_LLM_DECODE_ATTENTION", "fast")
    with pytest.raises(ValueError, match="FURIOSA_LLM_DECODE_ATTENTION='fast'"):
        ModelRunner(tiny_llama(4, 2), "cpu", num_blocks=8, block_size=4, max_model_len=32, decode_batch_sizes=[1])


def test_a_bucket_the_paged_path_serves_is_ready_at_once(monkeypatch):
    """JIT on top of the paged path: a bucket whose batch has a padded size needs no compilation (on cuda,
    its CUDA graph was captured at start-up), so the JIT's policy marks it ready and counts its steps."""
    from furiosa_llm.hal import Bucket

    r = runner(tiny_llama(4, 2), "paged", monkeypatch)
    r.compile_bucket(Bucket(4, 64), 1)
    # a bucket above the largest padded size (4, i.e. max_num_seqs 4): the scheduler never forms more rows,
    # so the paged path runs every batch of that bucket too
    r.compile_bucket(Bucket(8, 64), 1)
    assert r._compiled == {}  # nothing compiled: execute takes the paged path for it


def test_the_mode_is_read_case_blind_and_empty_means_auto(monkeypatch):
    model = tiny_llama(4, 2)
    for raw, paged in ((" Paged ", True), ("", False), ("GATHER", False)):
        monkeypatch.setenv("FURIOSA_LLM_DECODE_ATTENTION", raw)
        r = ModelRunner(model, "cpu", num_blocks=8, block_size=4, max_model_len=32, decode_batch_sizes=[1])
        assert (r.paged is not None) == paged, raw

"""The vectorized sampler against a per-row reference (the definitions, one row at a time)."""

from __future__ import annotations

import random

import torch

from furiosa_llm.hal import SamplingSettings, SequenceChunk
from furiosa_llm.model.sampler import Sampler, _apply_penalties, _filter

VOCAB = 50


def _chunk(i: int, rng: random.Random, **kw) -> SequenceChunk:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 8))]
    out = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 8))]
    return SequenceChunk(request_id=f"r{i}", token_ids=[0], start_pos=len(prompt) + len(out), block_table=[0],
                         sample=True, sampling=SamplingSettings(**kw), num_output_tokens=len(out),
                         prompt_token_ids=prompt, output_token_ids=out)


def _ref_penalties(row: torch.Tensor, c: SequenceChunk) -> torch.Tensor:
    s = c.sampling
    row = row.clone()
    seen = sorted(set(c.prompt_token_ids) | set(c.output_token_ids))
    if s.repetition_penalty != 1.0 and seen:
        v = row[seen]
        row[seen] = torch.where(v > 0, v / s.repetition_penalty, v * s.repetition_penalty)
    counts = torch.bincount(torch.tensor(list(c.output_token_ids), dtype=torch.long), minlength=VOCAB).float()
    return row - (s.frequency_penalty * counts + s.presence_penalty * (counts > 0).float())


def _ref_filter(row: torch.Tensor, c: SequenceChunk) -> torch.Tensor:
    s = c.sampling
    row = row / s.temperature
    if 0 < s.top_k < VOCAB:
        row = row.masked_fill(row < torch.topk(row, s.top_k).values[-1], float("-inf"))
    if s.top_p < 1.0:
        srt, order = torch.sort(row, descending=True)
        p = torch.softmax(srt, -1)
        drop = torch.cumsum(p, -1) - p >= s.top_p
        drop[0] = False
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if s.min_p > 0:
        p = torch.softmax(row, -1)
        row = row.masked_fill(p < s.min_p * p.max(), float("-inf"))
    return row


def _random_settings(rng: random.Random) -> dict:
    return dict(temperature=rng.choice([0.0, 0.5, 1.0, 1.7]), top_k=rng.choice([-1, 1, 5, 20]),
                top_p=rng.choice([1.0, 0.3, 0.9]), min_p=rng.choice([0.0, 0.05]),
                repetition_penalty=rng.choice([1.0, 1.3, 0.8]), presence_penalty=rng.choice([0.0, 0.5]),
                frequency_penalty=rng.choice([0.0, -0.4, 0.3]), seed=rng.choice([None, 7, 2**64 - 1]))


def test_batched_penalties_and_filters_equal_the_per_row_definitions():
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(20):
        chunks = [_chunk(i, rng, **_random_settings(rng)) for i in range(rng.randint(1, 9))]
        logits = torch.randn(len(chunks), VOCAB) * 3
        hist = [c for c in chunks if c.sampling.has_penalties]
        if hist:
            rows = torch.stack([logits[i] for i, c in enumerate(chunks) if c.sampling.has_penalties])
            got = _apply_penalties(rows.clone(), hist)
            want = torch.stack([_ref_penalties(r, c) for r, c in zip(rows, hist)])
            assert torch.allclose(got, want)
        rand = [c for c in chunks if not c.sampling.greedy]
        if rand:
            rows = torch.stack([logits[i] for i, c in enumerate(chunks) if not c.sampling.greedy])
            got = _filter(rows, rand)
            want = torch.stack([_ref_filter(r, c) for r, c in zip(rows, rand)])
            assert torch.equal(torch.isinf(got), torch.isinf(want))
            assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_greedy_and_top_k_1_rows_take_the_penalized_argmax():
    rng = random.Random(1)
    chunks = [_chunk(0, rng, temperature=0.0), _chunk(1, rng, temperature=0.0, repetition_penalty=2.0),
              _chunk(2, rng, temperature=1.0, top_k=1), _chunk(3, rng, temperature=0.9, top_k=1, presence_penalty=1.0)]
    logits = torch.randn(4, VOCAB)
    toks, lps = Sampler(0).sample(logits, chunks)
    assert toks == [int(_ref_penalties(logits[i], c).argmax()) for i, c in enumerate(chunks)]
    assert lps == [None] * 4


def test_seeded_rows_are_reproducible_whatever_the_batch():
    rng = random.Random(2)
    seeded = _chunk(0, rng, temperature=1.0, seed=1234)
    logits = torch.randn(1, VOCAB)
    alone = Sampler(0).sample(logits, [seeded])[0][0]
    for trial in range(5):
        others = [_chunk(i + 1, rng, temperature=1.0, top_p=0.9) for i in range(trial + 1)]
        batch = others[: trial // 2] + [seeded] + others[trial // 2:]
        rows = torch.randn(len(batch), VOCAB)
        rows[batch.index(seeded)] = logits[0]
        assert Sampler(trial).sample(rows, batch)[0][batch.index(seeded)] == alone


def test_sampled_frequencies_follow_the_filtered_distribution():
    rng = random.Random(3)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0] + [-30.0] * (VOCAB - 5))
    n = 4000
    chunks = [_chunk(i, rng, temperature=0.8, top_k=4) for i in range(n)]
    toks, _ = Sampler(5).sample(logits.expand(n, VOCAB).clone(), chunks)
    freq = torch.bincount(torch.tensor(toks), minlength=VOCAB).float() / n
    want = torch.softmax(_ref_filter(logits, chunks[0]), -1)
    assert freq[4:].sum() == 0  # outside the top 4: never
    assert torch.allclose(freq[:4], want[:4], atol=0.03), (freq[:4], want[:4])


def test_a_row_whose_logits_are_not_finite_samples_minus_one():
    """Non-finite logits (the model's numbers overflowed) used to sample token 0 in silence; the row gets -1 (the
    runner ends that request with an error) and the other rows sample as before."""
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    chunks = [SequenceChunk(f"r{i}", [1], 0, [0], True, SamplingSettings(temperature=t, logprobs=1))
              for i, t in enumerate((0.0, 0.0, 0.8))]
    tokens, lps = Sampler(0).sample(logits, chunks)
    assert tokens[1] == -1 and lps[1] is None
    assert tokens[0] == int(logits[0].argmax()) and 0 <= tokens[2] < 50 and lps[0] is not None
    logits[2, 3] = float("inf")
    assert Sampler(0).sample(logits, chunks)[0][2] == -1

"""Sampling: greedy, temperature, top-k, top-p, min-p, repetition/presence/frequency penalties,
per-request seeds and logprobs. Works on float32 logits of the rows that sample this step."""

from __future__ import annotations

import torch

from furiosa_llm.hal import SequenceChunk, TokenLogprob

from . import structured_outputs

_SEED_MIX = 0x9E3779B97F4A7C15


def _padded(rows: list, pad: int, device) -> torch.Tensor:
    """``rows`` of token ids as one ``[len(rows), longest]`` long tensor, padded with ``pad``."""
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _apply_penalties(logits: torch.Tensor, chunks: list[SequenceChunk]) -> torch.Tensor:
    """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties, in place.

    ``logits``: ``[len(chunks), vocab]``; every chunk here has ``sampling.has_penalties``. vLLM's
    definitions: repetition divides positive and multiplies negative logits of seen tokens;
    presence and frequency subtract ``presence * (count > 0) + frequency * count``.
    """
    n, vocab = logits.shape
    dev = logits.device
    rep = torch.tensor([c.sampling.repetition_penalty for c in chunks], dtype=logits.dtype, device=dev)[:, None]
    pres = torch.tensor([c.sampling.presence_penalty for c in chunks], dtype=logits.dtype, device=dev)[:, None]
    freq = torch.tensor([c.sampling.frequency_penalty for c in chunks], dtype=logits.dtype, device=dev)[:, None]
    out = _padded([c.output_token_ids for c in chunks], vocab, dev)  # the pad lands in a spare column
    counts = torch.zeros(n, vocab + 1, dtype=logits.dtype, device=dev).scatter_add_(
        1, out, torch.ones_like(out, dtype=logits.dtype))[:, :vocab]
    if any(c.sampling.repetition_penalty != 1.0 for c in chunks):
        prompt = _padded([c.prompt_token_ids for c in chunks], vocab, dev)
        seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=dev).scatter_(1, prompt, True)[:, :vocab]
        seen |= counts > 0
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    return logits - (freq * counts + pres * (counts > 0).to(logits.dtype))


def _filter(logits: torch.Tensor, chunks: list[SequenceChunk]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, for every row at once: the dropped tokens at -inf.

    ``logits``: ``[len(chunks), vocab]`` of rows that sample (temperature > 0). Top-k keeps ties
    with the k-th value; top-p keeps the smallest prefix of the sorted distribution whose mass
    reaches ``top_p``; min-p drops tokens below ``min_p`` times the largest probability.
    """
    n, vocab = logits.shape
    dev = logits.device
    st = [c.sampling for c in chunks]
    logits = logits / torch.tensor([s.temperature for s in st], dtype=logits.dtype, device=dev)[:, None]
    ks = [s.top_k if 0 < s.top_k < vocab else 0 for s in st]
    if any(ks):
        k = torch.tensor(ks, device=dev)
        top = torch.topk(logits, max(ks), dim=-1).values
        kth = top.gather(1, (k - 1).clamp(min=0)[:, None])
        logits = logits.masked_fill((k > 0)[:, None] & (logits < kth), float("-inf"))
    if any(s.top_p < 1.0 for s in st):
        top_p = torch.tensor([s.top_p for s in st], dtype=logits.dtype, device=dev)[:, None]
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs >= top_p) & (top_p < 1.0)
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    if any(s.min_p > 0.0 for s in st):
        min_p = torch.tensor([s.min_p for s in st], dtype=logits.dtype, device=dev)[:, None]
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def _mask_stops_before_min_tokens(logits: torch.Tensor, chunks: list[SequenceChunk]) -> torch.Tensor:
    """``logits`` with EOS and stop token ids at -inf in the rows that have fewer than ``min_tokens`` outputs.

    vLLM's ``min_tokens``: those tokens cannot be sampled until then. Log-probabilities are
    still reported from the unmasked logits.
    """
    rows, cols = [], []
    vocab = logits.shape[-1]
    for i, c in enumerate(chunks):
        s = c.sampling
        if c.num_output_tokens < s.min_tokens and s.stop_token_ids:
            ids = [t for t in s.stop_token_ids if t < vocab]
            rows += [i] * len(ids)
            cols += ids
    if not rows:
        return logits
    scores = logits.clone()
    scores[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
    return scores


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def _generator_for(self, chunk: SequenceChunk) -> torch.Generator:
        seed = chunk.sampling.seed
        if seed is None:
            return self.generator
        g = torch.Generator()
        # the k-th token of a seeded request always uses the same stream, whatever the batch
        g.manual_seed((seed * _SEED_MIX + chunk.num_output_tokens) % (2**63))
        return g

    def _exponential_noise(self, chunks: list[SequenceChunk], vocab: int) -> torch.Tensor:
        """``[len(chunks), vocab]`` Exp(1) draws on the cpu: one generator call for the unseeded rows,
        and a seeded row's own stream (``_generator_for``) for each seeded row."""
        noise = torch.empty(len(chunks), vocab)
        seeded = [i for i, c in enumerate(chunks) if c.sampling.seed is not None]
        if len(seeded) < len(chunks):
            noise.exponential_(generator=self.generator)
        for i in seeded:
            noise[i].exponential_(generator=self._generator_for(chunks[i]))
        return noise

    def sample(self, logits: torch.Tensor, chunks: list[SequenceChunk]) -> tuple[list[int], list[list[TokenLogprob] | None]]:
        """``logits``: [len(chunks), vocab] float32. Returns token ids (-1 for a row whose logits are not all
        finite) and optional logprob lists.

        The whole batch in a handful of tensor operations: penalties for the rows that set
        them, greedy rows by argmax, the others by temperature, top-k/top-p/min-p and an
        exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``, which draws ``i`` with probability
        ``p_i``); one device-to-host copy of the sampled ids.
        """
        logits = logits.float()
        scores = _mask_stops_before_min_tokens(logits, chunks)
        # ---- structured outputs (1/2): each constrained row's grammar bitmask ----
        scores = structured_outputs.apply_grammar_masks(scores, logits, chunks)
        hist = [i for i, c in enumerate(chunks) if c.sampling.has_penalties]  # not grammar-only rows
        if hist:
            if len(hist) == len(chunks):
                scores = _apply_penalties(scores, chunks)
            else:
                idx = torch.tensor(hist, device=logits.device)
                scores = scores.index_copy(0, idx, _apply_penalties(scores.index_select(0, idx), [chunks[i] for i in hist]))
        chosen = scores.argmax(dim=-1)
        rand = [i for i, c in enumerate(chunks) if not c.sampling.greedy]
        if rand:
            sub = [chunks[i] for i in rand]
            idx = torch.tensor(rand, device=logits.device)
            probs = torch.softmax(_filter(scores.index_select(0, idx), sub), dim=-1)
            noise = self._exponential_noise(sub, probs.shape[-1]).to(probs.device)
            chosen = chosen.index_copy(0, idx, (probs / noise).argmax(dim=-1))
        # a row whose logits are not all finite (NaN or inf: the model's numbers broke) samples -1, not a token
        chosen = torch.where(torch.isfinite(logits).all(dim=-1), chosen, -1)
        tokens = chosen.tolist()
        # ---- structured outputs (2/2): the matchers accept the sampled tokens ----
        structured_outputs.accept_tokens(tokens, chunks)
        logprobs: list[list[TokenLogprob] | None] = [None] * len(chunks)
        want = [i for i, c in enumerate(chunks) if c.sampling.logprobs is not None and tokens[i] >= 0]
        if want:
            lps = torch.log_softmax(logits[want], dim=-1)
            for row, i in zip(lps, want):
                logprobs[i] = token_logprobs(row, tokens[i], chunks[i].sampling.logprobs or 0)
        return tokens, logprobs


def token_logprobs(row: torch.Tensor, token_id: int, k: int) -> list[TokenLogprob]:
    """The chosen token's logprob and rank first, then the top ``k`` (vLLM's layout; -1: the whole vocabulary)."""
    k = row.numel() if k < 0 else min(k, row.numel())
    lp = float(row[token_id])
    rank = int((row > row[token_id]).sum()) + 1
    entries = [TokenLogprob(token_id, lp, rank)]
    if k > 0:
        vals, ids = torch.topk(row, k)
        entries += [TokenLogprob(int(t), float(v), r + 1) for r, (v, t) in enumerate(zip(vals.tolist(), ids.tolist()))]
    return entries

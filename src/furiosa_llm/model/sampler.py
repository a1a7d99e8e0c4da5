"""Sampling: greedy, temperature, top-k, top-p, min-p, repetition/presence/frequency penalties,
per-request seeds and logprobs. Works on float32 logits of the rows that sample this step."""

from __future__ import annotations

import torch

from furiosa_llm.hal import SequenceChunk, TokenLogprob

from . import structured_outputs

_SEED_MIX = 0x9E3779B97F4A7C15


def _apply_penalties(logits: torch.Tensor, chunk: SequenceChunk) -> torch.Tensor:
    s = chunk.sampling
    device = logits.device
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(list(chunk.prompt_token_ids) + list(chunk.output_token_ids), dtype=torch.long, device=device)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if (s.presence_penalty or s.frequency_penalty) and chunk.output_token_ids:
        out = torch.tensor(list(chunk.output_token_ids), dtype=torch.long, device=device)
        counts = torch.bincount(out, minlength=logits.numel())[: logits.numel()].to(logits.dtype)
        logits -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _filter(logits: torch.Tensor, chunk: SequenceChunk) -> torch.Tensor:
    s = chunk.sampling
    logits = logits / s.temperature
    if s.top_k > 0 and s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        drop = (cum - probs) >= s.top_p  # keep the smallest prefix whose mass reaches top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if s.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < s.min_p * probs.max(), float("-inf"))
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

    def sample(self, logits: torch.Tensor, chunks: list[SequenceChunk]) -> tuple[list[int], list[list[TokenLogprob] | None]]:
        """``logits``: [len(chunks), vocab] float32. Returns token ids and optional logprob lists."""
        logits = logits.float()
        scores = _mask_stops_before_min_tokens(logits, chunks)
        # ---- structured outputs (1/2): each constrained row's grammar bitmask ----
        scores = structured_outputs.apply_grammar_masks(scores, logits, chunks)
        simple = [i for i, c in enumerate(chunks) if c.sampling.greedy and not c.sampling.needs_history]
        tokens = [0] * len(chunks)
        if simple:
            idx = torch.tensor(simple, device=logits.device)
            for i, t in zip(simple, scores.index_select(0, idx).argmax(dim=-1).tolist()):
                tokens[i] = t
        for i, c in enumerate(chunks):
            if i in simple:
                continue
            row = _apply_penalties(scores[i].clone(), c)
            if c.sampling.greedy:
                tokens[i] = int(row.argmax())
                continue
            row = _filter(row, c)
            probs = torch.softmax(row, dim=-1).cpu()
            tokens[i] = int(torch.multinomial(probs, 1, generator=self._generator_for(c)))
        # ---- structured outputs (2/2): the matchers accept the sampled tokens ----
        structured_outputs.accept_tokens(tokens, chunks)
        logprobs: list[list[TokenLogprob] | None] = [None] * len(chunks)
        want = [i for i, c in enumerate(chunks) if c.sampling.logprobs is not None]
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

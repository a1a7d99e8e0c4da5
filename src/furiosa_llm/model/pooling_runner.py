"""The pooling runner: an encoder (BERT-family) model's forward over a batch of whole prompts, then pooling.

A decoder model served as an embedder (``task="embed"``) runs here too: its base model (causal
attention, right padding, so no real token attends a pad) and by default last-token pooling.

Pooling requests are prefill-only and never chunked, so each ``SequenceChunk`` of a batch is one
whole prompt. The encoder attends bidirectionally and keeps no K/V after the step: the scheduler
allocates blocks for the request as for any other (they bound memory and are freed when the step
returns), but this runner does not read or write them. A BERT model runs padding-free: the step's
prompts packed into one row of tokens (``packed_encoder``); another encoder runs Hugging Face's
forward on prompts right-padded to the longest with an attention mask. The hidden states are
pooled per the model's pooling type
(mean over the real tokens, the first token (CLS) or the last). Vectors leave as plain float
lists, not normalized: normalization and ``dimensions`` are the API layer's (``PoolingParams``).
"""

from __future__ import annotations

import logging

import torch

from furiosa_llm.hal import Batch, SamplingSettings, SequenceChunk, StepResult

from .packed_encoder import PackedBertEncoder
from .packed_encoder import supports as packed_supports

logger = logging.getLogger("furiosa_llm.model")


class PoolingRunner:
    """Executes a ``Batch`` of pooling chunks on an encoder model; a ``BatchExecutor`` for the HAL."""

    jit_backend = None

    def __init__(self, hf_model, device: str, pooling_type: str = "MEAN", pad_token_id: int = 0):
        self.device = torch.device(device)
        self.model = hf_model.to(self.device)
        self.pooling_type = pooling_type
        self.pad_token_id = pad_token_id
        self.hidden_size = hf_model.config.hidden_size
        self.token_types = getattr(hf_model.config, "type_vocab_size", 0) > 0  # BERT takes token_type_ids
        # the padding-free packed forward where the architecture allows (BERT), else Hugging Face's padded one
        self.packed = PackedBertEncoder(self.model, self.device) if packed_supports(hf_model.config) else None

    @torch.inference_mode()
    def execute(self, batch: Batch) -> StepResult:
        seqs = batch.sequences
        for s in seqs:
            if not s.pool or s.start_pos != 0:
                raise ValueError(f"request {s.request_id!r}: the pooling runner runs whole prompts of pooling requests only")
        pooled = self._pool_packed(seqs) if self.packed is not None else self._pool_padded(seqs)
        vectors = pooled.float().cpu().tolist()
        return StepResult(step_id=batch.step_id, pooled={s.request_id: v for s, v in zip(seqs, vectors)})

    def _pool_packed(self, seqs) -> torch.Tensor:
        """``[B, hidden]`` pooled vectors from the padding-free forward (``PackedBertEncoder``)."""
        hidden, starts, lengths = self.packed.forward([s.token_ids for s in seqs])
        if self.pooling_type == "CLS":
            return hidden[torch.tensor(starts, device=self.device)]
        if self.pooling_type == "LAST":
            return hidden[torch.tensor([a + n - 1 for a, n in zip(starts, lengths)], device=self.device)]
        lens = torch.tensor(lengths, device=self.device)
        seg = torch.repeat_interleave(torch.arange(len(seqs), device=self.device), lens)
        sums = hidden.new_zeros(len(seqs), hidden.shape[1]).index_add_(0, seg, hidden)
        return sums / lens.unsqueeze(1).to(sums.dtype)

    def _pool_padded(self, seqs) -> torch.Tensor:
        """``[B, hidden]`` pooled vectors from the Hugging Face forward, right-padded to the longest prompt."""
        longest = max(len(s.token_ids) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            n = len(s.token_ids)
            ids[i, :n] = torch.tensor(s.token_ids, dtype=torch.long)
            mask[i, :n] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        extra = {"token_type_ids": torch.zeros_like(ids)} if self.token_types else {}
        hidden = self.model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
        if self.pooling_type == "CLS":
            return hidden[:, 0]
        if self.pooling_type == "LAST":
            return hidden[torch.arange(len(seqs), device=self.device), mask.sum(1) - 1]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def probe(self) -> None:
        """Run one one-token pooling row through ``execute`` (raises if the device fails)."""
        chunk = SequenceChunk(request_id="__probe__", token_ids=[self.pad_token_id], start_pos=0, block_table=[],
                              sample=False, sampling=SamplingSettings(), pool=True)
        self.execute(Batch(step_id=-1, sequences=[chunk]))

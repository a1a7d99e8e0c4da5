"""The pooling runner: an encoder (BERT-family) model's forward over a batch of whole prompts, then pooling.

Pooling requests are prefill-only and never chunked, so each ``SequenceChunk`` of a batch is one
whole prompt. The encoder attends bidirectionally and keeps no K/V after the step: the scheduler
allocates blocks for the request as for any other (they bound memory and are freed when the step
returns), but this runner does not read or write them. Sequences are right-padded to the batch's
longest with an attention mask; the hidden states are pooled per the model's pooling type
(mean over the real tokens, the first token (CLS) or the last). Vectors leave as plain float
lists, not normalized: normalization and ``dimensions`` are the API layer's (``PoolingParams``).
"""

from __future__ import annotations

import logging

import torch

from furiosa_llm.hal import Batch, SamplingSettings, SequenceChunk, StepResult

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

    @torch.inference_mode()
    def execute(self, batch: Batch) -> StepResult:
        seqs = batch.sequences
        for s in seqs:
            if not s.pool or s.start_pos != 0:
                raise ValueError(f"request {s.request_id!r}: the pooling runner runs whole prompts of pooling requests only")
        longest = max(len(s.token_ids) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            n = len(s.token_ids)
            ids[i, :n] = torch.tensor(s.token_ids, dtype=torch.long)
            mask[i, :n] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        if self.pooling_type == "CLS":
            pooled = hidden[:, 0]
        elif self.pooling_type == "LAST":
            pooled = hidden[torch.arange(len(seqs), device=self.device), mask.sum(1) - 1]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        vectors = pooled.float().cpu().tolist()
        return StepResult(step_id=batch.step_id, pooled={s.request_id: v for s, v in zip(seqs, vectors)})

    def probe(self) -> None:
        """Run one one-token pooling row through ``execute`` (raises if the device fails)."""
        chunk = SequenceChunk(request_id="__probe__", token_ids=[self.pad_token_id], start_pos=0, block_table=[],
                              sample=False, sampling=SamplingSettings(), pool=True)
        self.execute(Batch(step_id=-1, sequences=[chunk]))

"""``furiosa_llm.outputs``: the output types, at Furiosa-LLM's (and vLLM's) module path."""

from __future__ import annotations

from .api.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    PoolingOutput,
    PoolingRequestOutput,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
)
from .api.sampling_params import RequestOutputKind

__all__ = [
    "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "Logprob", "PoolingOutput",
    "PoolingRequestOutput", "PromptLogprobs", "RequestMetrics", "RequestOutput", "RequestOutputKind",
    "SampleLogprobs",
]

"""``furiosa_llm.sampling_params``: ``SamplingParams`` and its enums, at Furiosa-LLM's (and vLLM's) module path."""

from __future__ import annotations

from .api.sampling_params import RequestOutputKind, SamplingParams, SamplingType
from .api.structured_outputs import StructuredOutputsParams

__all__ = ["RequestOutputKind", "SamplingParams", "SamplingType", "StructuredOutputsParams"]

"""``furiosa_llm.api``: Furiosa-LLM's module of the same name (``from furiosa_llm.api import LLM,
RequestOutput, SchedulerConfig``), over this package's modules.

Every name loads on first use (``__getattr__``), so importing ``furiosa_llm.api``, or any module
in it, stays cheap: no torch, no transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

_EXPORTS = {
    "LLM": "furiosa_llm.api.llm",
    "LLMEngine": "furiosa_llm.api.llm_engine",
    "AsyncLLMEngine": "furiosa_llm.api.async_llm_engine",
    "EngineArgs": "furiosa_llm.api.engine_args",
    "AsyncEngineArgs": "furiosa_llm.api.engine_args",
    "SamplingParams": "furiosa_llm.api.sampling_params",
    "SamplingType": "furiosa_llm.api.sampling_params",
    "RequestOutputKind": "furiosa_llm.api.sampling_params",
    "RequestOutput": "furiosa_llm.api.outputs",
    "CompletionOutput": "furiosa_llm.api.outputs",
    "PoolingParams": "furiosa_llm.api.outputs",
    "PoolingOutput": "furiosa_llm.api.outputs",
    "PoolingRequestOutput": "furiosa_llm.api.outputs",
    "EmbeddingOutput": "furiosa_llm.api.outputs",
    "EmbeddingRequestOutput": "furiosa_llm.api.outputs",
    "ScoringOutput": "furiosa_llm.api.outputs",
    "ScoringRequestOutput": "furiosa_llm.api.outputs",
    "SchedulerConfig": "furiosa_llm.api.scheduler_config",
    "TextPrompt": "furiosa_llm.api.inputs",
    "TokensPrompt": "furiosa_llm.api.inputs",
    "PromptType": "furiosa_llm.api.inputs",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    from .async_llm_engine import AsyncLLMEngine
    from .engine_args import AsyncEngineArgs, EngineArgs
    from .inputs import PromptType, TextPrompt, TokensPrompt
    from .llm import LLM
    from .llm_engine import LLMEngine
    from .outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, PoolingOutput, PoolingParams,
                          PoolingRequestOutput, RequestOutput)
    from .sampling_params import RequestOutputKind, SamplingParams, SamplingType
    from .scheduler_config import SchedulerConfig

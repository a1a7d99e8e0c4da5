"""furiosa_llm: a simulator-first LLM serving engine with the Python API of Furiosa-LLM.

Importing the package is cheap: the heavy modules (torch, transformers) load on first use.
Furiosa-LLM's module paths are here too: ``furiosa_llm.outputs``, ``furiosa_llm.sampling_params``,
``furiosa_llm.llm_engine`` and ``furiosa_llm.api`` (thin re-exports of ``furiosa_llm.api.*``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "furiosa_llm.api.llm",
    "LLMEngine": "furiosa_llm.api.llm_engine",
    "PromptTooLongError": "furiosa_llm.api.llm_engine",
    "AsyncLLMEngine": "furiosa_llm.api.async_llm_engine",
    "AsyncEngineDeadError": "furiosa_llm.api.async_llm_engine",
    "RequestFailedError": "furiosa_llm.api.async_llm_engine",
    "EngineDeadError": "furiosa_llm.api.llm_engine",
    "EngineArgs": "furiosa_llm.api.engine_args",
    "AsyncEngineArgs": "furiosa_llm.api.engine_args",
    "SamplingParams": "furiosa_llm.api.sampling_params",
    "SamplingType": "furiosa_llm.api.sampling_params",
    "RequestOutputKind": "furiosa_llm.api.sampling_params",
    "SchedulerConfig": "furiosa_llm.api.scheduler_config",
    "RequestOutput": "furiosa_llm.api.outputs",
    "CompletionOutput": "furiosa_llm.api.outputs",
    "RequestMetrics": "furiosa_llm.api.outputs",
    "Logprob": "furiosa_llm.api.outputs",
    "PoolingParams": "furiosa_llm.api.outputs",
    "PoolingOutput": "furiosa_llm.api.outputs",
    "PoolingRequestOutput": "furiosa_llm.api.outputs",
    "EmbeddingOutput": "furiosa_llm.api.outputs",
    "EmbeddingRequestOutput": "furiosa_llm.api.outputs",
    "ScoringOutput": "furiosa_llm.api.outputs",
    "ScoringRequestOutput": "furiosa_llm.api.outputs",
    "TextPrompt": "furiosa_llm.api.inputs",
    "TokensPrompt": "furiosa_llm.api.inputs",
    "PromptType": "furiosa_llm.api.inputs",
}

__all__ = sorted(_EXPORTS)

_SUBMODULES = frozenset({"api", "outputs", "sampling_params", "llm_engine"})
"""Furiosa-LLM's public module paths, loaded on attribute access too (``furiosa_llm.outputs.RequestOutput``)."""


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"furiosa_llm.{name}")
    raise AttributeError(f"module 'furiosa_llm' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .api.async_llm_engine import AsyncEngineDeadError, AsyncLLMEngine, RequestFailedError
    from .api.engine_args import AsyncEngineArgs, EngineArgs
    from .api.inputs import PromptType, TextPrompt, TokensPrompt
    from .api.llm import LLM
    from .api.llm_engine import EngineDeadError, LLMEngine, PromptTooLongError
    from .api.outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob, PoolingOutput,
                              PoolingParams, PoolingRequestOutput, RequestMetrics, RequestOutput)
    from .api.sampling_params import RequestOutputKind, SamplingParams, SamplingType
    from .api.scheduler_config import SchedulerConfig

"""Output types: RequestOutput, CompletionOutput, Logprob, RequestMetrics, pooling types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from furiosa_llm.core.metrics import RequestMetrics  # the core's timing record, shown as it is


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # why the request failed, when its finish_reason is "error"


@dataclass(kw_only=True)
class PoolingParams:
    truncate_prompt_tokens: int | None = None
    dimensions: int | None = None
    normalize: bool = True
    task: str | None = None


@dataclass(slots=True)
class PoolingOutput:
    data: Any


@dataclass(slots=True)
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int] = field(default_factory=list)
    finished: bool = True

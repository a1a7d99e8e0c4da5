"""Output types: RequestOutput, CompletionOutput, Logprob, RequestMetrics, pooling and embedding types."""

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
    last_token_truncated: bool = False
    """True when ``text`` ends partway through the text of the last token of ``token_ids``: a stop
    string was found inside that token's text and the output was cut there (without the stop
    string, unless ``include_stop_str_in_output``), so the token is in ``token_ids`` but only part
    of its text is in ``text``. False otherwise, and on every output before the last."""

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

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens in this output's completions (with ``RequestOutputKind.DELTA``, the new ones only)."""
        return sum(len(o.token_ids) for o in self.outputs)


POOLING_TASKS = ("embed", "encode", "classify", "score", "token_embed", "token_classify")
SUPPORTED_POOLING_TASKS = ("embed", "encode")  # what an embedding model here answers


@dataclass(kw_only=True)
class PoolingParams:
    """Parameters of a pooling request (vLLM's and Furiosa-LLM's ``PoolingParams``).

    ``truncate_prompt_tokens``: -1 (truncate to ``max_model_len``) or k >= 0 (keep k tokens: the
    first for CLS pooling, the last otherwise); ``dimensions``: keep the first ``dimensions``
    values of the vector (then normalize), >= 1 and at most the model's hidden size; ``normalize``:
    L2-normalize the vector; ``task``: one of ``POOLING_TASKS``. A bad value is a ``ValueError``.
    """

    truncate_prompt_tokens: int | None = None
    dimensions: int | None = None
    normalize: bool = True
    task: str | None = None

    def __post_init__(self) -> None:
        t = self.truncate_prompt_tokens
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < -1):
            raise ValueError(f"truncate_prompt_tokens={t!r}: must be -1 (truncate to max_model_len) or an int >= 0")
        d = self.dimensions
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"dimensions={d!r}: must be an int >= 1")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize={self.normalize!r}: must be a bool")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"task={self.task!r}: must be one of {', '.join(POOLING_TASKS)}")

    def verify(self, *, hidden_size: int) -> None:
        """Check the parameters against the model: ``dimensions`` up to ``hidden_size``, a task it answers."""
        self.__post_init__()
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise ValueError(f"dimensions={self.dimensions}: must be <= the model's hidden size {hidden_size}")
        if self.task is not None and self.task not in SUPPORTED_POOLING_TASKS:
            raise ValueError(f"task={self.task!r}: this embedding model answers {', '.join(SUPPORTED_POOLING_TASKS)}")


@dataclass(slots=True)
class PoolingOutput:
    data: Any


@dataclass(slots=True)
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int] = field(default_factory=list)
    finished: bool = True
    error: str | None = None  # why the request failed (its step failed); None otherwise
    aborted: bool = False  # the request was aborted before its vector was computed (``outputs.data`` is None)


@dataclass(slots=True)
class EmbeddingOutput:
    """One embedding vector (vLLM's ``EmbeddingOutput``)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)

    @classmethod
    def from_base(cls, pooling_output: PoolingOutput) -> "EmbeddingOutput":
        data = pooling_output.data
        return cls(list(data.tolist() if hasattr(data, "tolist") else data))


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """A finished embedding request (vLLM's ``EmbeddingRequestOutput``)."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int] = field(default_factory=list)
    finished: bool = True

    @classmethod
    def from_base(cls, request_output: PoolingRequestOutput) -> "EmbeddingRequestOutput":
        return cls(request_output.request_id, EmbeddingOutput.from_base(request_output.outputs),
                   list(request_output.prompt_token_ids), request_output.finished)


@dataclass(slots=True)
class ScoringOutput:
    """The score of one (text_1, text_2) pair (vLLM's ``ScoringOutput``)."""

    score: float


@dataclass(slots=True)
class ScoringRequestOutput:
    """A finished score of one pair (vLLM's ``ScoringRequestOutput``); ``prompt_token_ids`` are both texts' tokens."""

    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int] = field(default_factory=list)
    finished: bool = True

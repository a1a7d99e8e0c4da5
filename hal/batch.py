"""The execution-queue interface types: what the engine core submits and what a backend returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    """Per-request sampling settings a backend's sampler needs.

    The fields of ``SamplingParams`` with the same names (``SamplingParams.settings`` copies
    them by name), except ``stop_token_ids``: every token that may not be sampled before
    ``min_tokens`` output tokens exist (the request's stop token ids, and the model's EOS
    ids unless ``ignore_eos``). ``structured``: the request's own grammar state (opaque here; see
    ``furiosa_llm.model.structured_outputs.GrammarState``) when its output is constrained, else None.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    structured: object = field(default=None, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        """A repetition, presence or frequency penalty is set (the sampler applies them from the token history)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_history(self) -> bool:
        """The sampler reads the request's earlier tokens: penalties, or a grammar state to rebuild if it drifted."""
        return self.structured is not None or self.has_penalties


@dataclass(slots=True)
class SequenceChunk:
    """The tokens of one request computed in one step.

    ``token_ids`` sit at positions ``start_pos ..``; their K/V are written into the blocks of
    ``block_table`` and attention reads positions ``0 .. start_pos + len(token_ids)`` from it.
    When ``sample`` is set the backend samples the request's next token after the chunk.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    sampling: SamplingSettings
    num_output_tokens: int = 0
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    owner: object = None  # opaque handle of the core's request; backends ignore it
    pool: bool = False  # a pooling request: the chunk is its whole prompt; the backend returns its pooled vector

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True, slots=True, order=True)
class Bucket:
    """A padded decode shape that a backend can compile: ``batch`` rows attending up to ``length`` positions."""

    batch: int
    length: int

    def __str__(self) -> str:
        return f"b{self.batch}xl{self.length}"


@dataclass(slots=True)
class CompileResult:
    """What a backend reports when a bucket's compilation ends."""

    bucket: Bucket
    ok: bool
    seconds: float
    error: str | None = None


@dataclass(slots=True)
class Batch:
    step_id: int
    sequences: list[SequenceChunk]
    bucket: Bucket | None = None  # set when the step runs on this compiled bucket (JIT), padded to its shape

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int


@dataclass(slots=True)
class StepResult:
    """What a backend returns for one ``Batch``: sampled token ids (or pooled vectors) keyed by request id, and its times."""

    step_id: int
    sampled: dict[str, int] = field(default_factory=dict)
    # request id -> the pooled vector of a pooling chunk (plain floats; not normalized: the API layer does that)
    pooled: dict[str, list[float]] = field(default_factory=dict)
    # request id -> (sampled token's logprob entry, top-k entries)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    # request id -> one entry list per prompt position computed in this chunk (None for position 0)
    prompt_logprobs: dict[str, list[list[TokenLogprob] | None]] = field(default_factory=dict)
    # request id -> why the backend could not compute that request's step (e.g. its logits are not finite); the
    # core ends just that request with finish reason "error", and the batch's other requests go on
    errors: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    # host seconds the step costs beyond the device (scheduling, sampling, detokenizing); set by
    # backends that model time (the simulator); 0 where the host's time is simply the wall clock's
    host_s: float = 0.0

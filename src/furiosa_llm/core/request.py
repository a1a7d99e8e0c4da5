"""A request as the core sees it: token ids, counters, a block table and a status. No torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from furiosa_llm.hal import SamplingSettings

from .block_allocator import BlockTable
from .metrics import RequestMetrics


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the step that computed it failed

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                       RequestStatus.FINISHED_ERROR})


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    # a pooling request: prefill only, its whole prompt in one step (never chunked), then finished ("stop")
    # with its pooled vector; no prefix caching, no decode
    pooling: bool = False

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # prompt + outputs; what a (re)computation must cover
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    block_table: BlockTable = field(default_factory=BlockTable)
    # (chain hash, token ids) of the full blocks of token_ids hashed so far (the allocator's block_hashes
    # memo): a block is hashed once in the request's life, however often it is looked up or committed
    block_hashes: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    in_batch: bool = False  # part of a batch in flight whose result is not folded in yet
    slot: int = 0  # the batch slot it belongs to while running (SchedulerConfig.num_batch_slots)
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    reported: bool = False  # an output of this request has left the core (the first carries timing)
    metrics: RequestMetrics = field(init=False)  # the request's timing record, on the core's clock
    needs_history: bool = field(init=False, default=False)  # the sampler reads earlier tokens (penalties)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.needs_history = self.sampling.needs_history
        self.metrics = RequestMetrics(self.arrival_time)

    @property
    def block_ids(self) -> list[int]:
        return self.block_table.ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

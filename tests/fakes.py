"""A fake device at the HAL seam: no model, deterministic tokens, synchronous or queued."""

from __future__ import annotations

import collections

from furiosa_llm.hal import Batch, ExecutionQueue, QueueFullError, StepResult


def fake_token(request_id: str, position: int, vocab: int = 1000) -> int:
    return (hash(request_id) * 31 + position * 7) % vocab + 10


class FakeQueue(ExecutionQueue):
    """Batches complete in order when ``wait()`` is called; the token sampled for a request
    depends only on its id and position, so results do not depend on batching."""

    def __init__(self, limit: int = 1, eos: int | None = None, eos_after: dict[str, int] | None = None):
        super().__init__(limit)
        self._q: collections.deque[Batch] = collections.deque()
        self.submitted: list[Batch] = []
        self.eos = eos
        self.eos_after = eos_after or {}
        self.now = 0.0

    def submit(self, batch: Batch) -> None:
        if len(self._q) >= self.limit:
            raise QueueFullError("full")
        self._q.append(batch)
        self.submitted.append(batch)

    @property
    def in_flight(self) -> int:
        return len(self._q)

    def wait(self) -> StepResult:
        batch = self._q.popleft()
        res = StepResult(batch.step_id, started_at=self.now)
        self.now += 0.01
        for s in batch.sequences:
            if s.sample:
                tok = fake_token(s.request_id, s.context_len)
                if self.eos is not None and s.num_output_tokens + 1 >= self.eos_after.get(s.request_id, 10**9):
                    tok = self.eos
                res.sampled[s.request_id] = tok
        res.finished_at = self.now
        return res

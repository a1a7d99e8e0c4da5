"""A fake device at the HAL seam: no model, deterministic tokens, synchronous or queued."""

from __future__ import annotations

import collections

from furiosa_llm.hal import Batch, Bucket, CompileResult, ExecutionQueue, QueueFullError, StepResult


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
        self.compiling: list[Bucket] = []  # started, not yet ended
        self.compile_log: list[Bucket] = []  # every compilation started
        self.ready: set[Bucket] = set()

    def compile(self, bucket: Bucket, num_units: int) -> None:
        assert num_units >= 1
        self.compiling.append(bucket)
        self.compile_log.append(bucket)

    def end_compile(self, i: int, ok: bool) -> Bucket:
        bucket = self.compiling.pop(i)
        if ok:
            self.ready.add(bucket)
        self._done_compiles.append(CompileResult(bucket, ok, 1.0, None if ok else "planted failure"))
        return bucket

    def submit(self, batch: Batch) -> None:
        if len(self._q) >= self.limit:
            raise QueueFullError("full")
        if batch.bucket is not None:  # runs on a compiled graph: it must exist and fit the batch
            assert batch.bucket in self.ready, f"bucket {batch.bucket} is not compiled"
            assert all(len(s.token_ids) == 1 for s in batch.sequences)
            assert len(batch.sequences) <= batch.bucket.batch
            assert max(s.context_len for s in batch.sequences) <= batch.bucket.length
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

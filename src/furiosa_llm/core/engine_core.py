"""EngineCore: the scheduler driving an execution queue, with an injected clock. No torch, no asyncio."""

from __future__ import annotations

from typing import Callable

from furiosa_llm.hal import ExecutionQueue, StepResult

from .jit import JitPolicy
from .request import Request, RequestStatus
from .scheduler import CoreOutput, Scheduler


class EngineCore:
    def __init__(self, scheduler: Scheduler, queue: ExecutionQueue, clock: Callable[[], float],
                 jit: JitPolicy | None = None) -> None:
        self.scheduler = scheduler
        self.queue = queue
        self.clock = clock
        self.jit = jit

    @property
    def allocator(self):
        return self.scheduler.allocator

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def abort(self, request_id: str) -> Request | None:
        """Abort a live request and free its blocks at once; an unknown id is harmless."""
        return self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED, now=self.clock())

    def finish(self, request_id: str, stop_reason: str) -> Request | None:
        """Stop a request for a reason found above the core (a stop string)."""
        return self.scheduler.finish(request_id, RequestStatus.FINISHED_STOPPED, stop_reason, now=self.clock())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def submit(self) -> int:
        """Schedule and submit batches while the queue has room; returns how many were submitted.

        With JIT on, each batch's bucket is counted, runs compiled when it is ready, and buckets
        that reached the threshold start compiling on the backend.
        """
        self.poll_compilations()
        n = 0
        while self.queue.has_room:
            batch = self.scheduler.schedule(self.clock())
            if batch is None:
                break
            self.prepare(batch)
            self.queue.submit(batch)
            n += 1
        return n

    def poll_compilations(self) -> None:
        """Fold finished JIT compilations into the policy."""
        if self.jit is not None:
            for res in self.queue.compiled():
                self.jit.finish(res.bucket, res.ok, res.seconds, self.clock(), res.error)

    def prepare(self, batch) -> None:
        """JIT: count the batch's bucket, mark it to run compiled when ready, start due compilations."""
        jit = self.jit
        if jit is None:
            return
        batch.bucket = jit.observe(batch)
        for bucket in jit.start():
            self.queue.compile(bucket, jit.num_units)

    def wait(self) -> StepResult | None:
        return self.queue.wait() if self.queue.in_flight else None

    def process(self, result: StepResult) -> list[CoreOutput]:
        return self.scheduler.update(result, self.clock())

    def step(self) -> list[CoreOutput]:
        """One engine step: fill the queue, wait for the oldest batch, fold its result in."""
        self.submit()
        result = self.wait()
        return [] if result is None else self.process(result)

"""EngineCore: the scheduler driving an execution queue, with an injected clock. No torch, no asyncio.

One step is: ``submit`` (schedule batches while the queue has room), wait for the oldest batch
on the queue, ``process`` its result. ``step()`` does all three; a driver that waits in its own
way (the simulator's SimPy process) calls ``submit`` and ``process`` around its wait. Requests
can be added and aborted from other threads while a step waits on the device: every change of
the scheduler's state holds ``lock``, and the wait does not.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable

from furiosa_llm.hal import Batch, ExecutionQueue, StepResult

from .config import EngineConfig
from .jit import JitPolicy
from .metrics import EngineStats
from .request import Request, RequestStatus
from .scheduler import CoreOutput, Scheduler


class EngineCore:
    MAX_CONSECUTIVE_FAILURES = 3  # failed steps in a row after which the device counts as lost

    def __init__(self, scheduler: Scheduler, queue: ExecutionQueue, clock: Callable[[], float],
                 jit: JitPolicy | None = None) -> None:
        self.scheduler = scheduler
        self.queue = queue
        self.clock = clock
        self.jit = jit
        self.lock = threading.RLock()
        self.consecutive_failures = 0
        self.last_error: BaseException | None = None
        self.dead = False  # the device failed a probe after repeated failures: no step runs again

    @classmethod
    def from_config(cls, config: EngineConfig, queue: ExecutionQueue, clock: Callable[[], float], *,
                    eos_token_ids: frozenset[int] = frozenset(), num_layers: int = 1,
                    record_trace: bool = False) -> "EngineCore":
        """A core for one replica: its scheduler from ``config.scheduler_config``, a JIT policy when ``config.jit_config.enabled``.

        ``num_layers`` is the model's layer count (the JIT policy compiles in units of layers).
        """
        sched = Scheduler(config.scheduler_config, eos_token_ids=eos_token_ids, record_trace=record_trace)
        jit = JitPolicy(config.jit_config, num_layers=num_layers) if config.jit_config.enabled else None
        return cls(sched, queue, clock, jit=jit)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue ``request``; a ``ValueError`` when a live request has its id."""
        with self.lock:
            self.scheduler.add(request)

    def abort(self, request_id: str) -> Request | None:
        """Abort a live request and free its blocks at once; an unknown id is harmless (None)."""
        with self.lock:
            return self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED, now=self.clock())

    def stop(self, request_id: str, stop_reason: str) -> Request | None:
        """End a request for a reason found above the core (a stop string in its text)."""
        with self.lock:
            return self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED, stop_reason,
                                                 now=self.clock())

    def has_unfinished(self) -> bool:
        with self.lock:
            return self.scheduler.has_unfinished()

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        """One engine step: fill the queue, wait for the oldest batch, fold its result in.

        A batch whose execution raises fails its own requests (finish reason "error", blocks
        freed) and nothing else; see ``fail_oldest`` and ``dead``.
        """
        if self.dead:
            raise RuntimeError(f"the engine core is dead: {self.last_error!r}") from self.last_error
        self.submit()
        if not self.queue.in_flight:
            return []
        try:
            result = self.queue.wait()  # the device works without the lock held
        except Exception as e:  # noqa: BLE001 - a failed batch ends its requests, the engine goes on
            return self.fail_oldest(e)
        self.consecutive_failures = 0
        return self.process(result)

    def fail_oldest(self, error: BaseException) -> list[CoreOutput]:
        """The oldest batch in flight failed with ``error``: end its requests with finish reason "error".

        After ``MAX_CONSECUTIVE_FAILURES`` failed steps in a row the device is probed
        (``queue.healthy()``): if the probe fails too the core is ``dead``; if it works, the
        requests were to blame (a client retrying a poison request) and the count starts again.
        """
        with self.lock:
            self.consecutive_failures += 1
            self.last_error = error
            step_id = next(iter(self.scheduler.in_flight))
            outputs = self.scheduler.fail_batch(step_id, f"{type(error).__name__}: {error}", self.clock())
        if self.consecutive_failures >= self.MAX_CONSECUTIVE_FAILURES:
            if self.queue.healthy():
                self.consecutive_failures = 0
            else:
                self.dead = True
        return outputs

    def submit(self, on_batch: Callable[[Batch], None] | None = None) -> int:
        """Schedule and submit batches while the queue has room; returns how many were submitted.

        With JIT on, each batch's bucket is counted, runs compiled when it is ready, and buckets
        that reached the threshold start compiling on the backend. ``on_batch`` (a test's hook)
        sees each batch right after it is submitted.
        """
        with self.lock:
            self._fold_compilations()
            n = 0
            while self.queue.has_room:
                batch = self.scheduler.schedule(self.clock())
                if batch is None:
                    break
                self._prepare(batch)
                self.queue.submit(batch)
                n += 1
                if on_batch is not None:
                    on_batch(batch)
            return n

    def process(self, result: StepResult) -> list[CoreOutput]:
        """Fold a completed batch's result into its requests."""
        with self.lock:
            return self.scheduler.update(result, self.clock())

    def poll_compilations(self) -> None:
        """Fold the backend's finished JIT compilations into the policy (``submit`` does this first)."""
        with self.lock:
            self._fold_compilations()

    def _fold_compilations(self) -> None:
        if self.jit is not None:
            for res in self.queue.compiled():
                self.jit.end_compilation(res.bucket, res.ok, res.seconds, self.clock(), res.error)

    def _prepare(self, batch: Batch) -> None:
        """JIT: count the batch's bucket, mark it to run compiled when ready, start due compilations."""
        jit = self.jit
        if jit is None:
            return
        batch.bucket = jit.observe(batch)
        for bucket in jit.start():
            self.queue.compile(bucket, jit.num_units)

    # ---- stats as data -------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot of the core's state and counters."""
        with self.lock:
            s = self.scheduler
            a, c = s.allocator, s.stats
            return EngineStats(
                num_running=len(s.running), num_waiting=len(s.waiting),
                num_kv_blocks_used=a.num_used, num_kv_blocks_total=a.num_blocks,
                num_steps=c.num_steps, num_preemptions=c.num_preemptions,
                num_prompt_tokens_computed=c.num_prompt_tokens_computed, num_cached_tokens=c.num_cached_tokens,
                num_generated_tokens=c.num_generated_tokens,
                jit=None if self.jit is None else dataclasses.replace(self.jit.stats),
                num_prefix_cache_queries=c.num_prefix_cache_queries,
            )

    @property
    def num_kv_blocks_used(self) -> int:
        """KV blocks in use now (``stats().num_kv_blocks_used`` without the snapshot)."""
        return self.scheduler.allocator.num_used

    @property
    def num_unfinished(self) -> int:
        """Live requests (running or waiting)."""
        return len(self.scheduler.requests)

    @property
    def trace(self) -> list | None:
        """The scheduler's decision trace (``record_trace=True``): ``(step_id, ((request_id, num_tokens), ...))``."""
        return self.scheduler.trace

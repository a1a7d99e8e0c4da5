"""The execution queue: the engine submits ``Batch``es and later receives ``StepResult``s in order.

At most ``limit`` batches (``npu_queue_limit``) are submitted and not yet completed. Every
backend implements this interface; nothing above ``hal`` knows which backend it talks to.
"""

from __future__ import annotations

import abc
import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Protocol

from .batch import Batch, Bucket, CompileResult, StepResult


class QueueFullError(RuntimeError):
    pass


class ExecutionQueue(abc.ABC):
    def __init__(self, limit: int = 1) -> None:
        if limit < 1:
            raise ValueError(f"npu_queue_limit={limit}: must be >= 1")
        self.limit = limit
        self._done_compiles: list[CompileResult] = []  # ended, not yet reported by ``compiled()``

    @abc.abstractmethod
    def submit(self, batch: Batch) -> None:
        """Enqueue a batch. Raises ``QueueFullError`` when ``limit`` batches are in flight."""

    @abc.abstractmethod
    def wait(self) -> StepResult:
        """Block until the oldest in-flight batch completes and return its result."""

    @property
    @abc.abstractmethod
    def in_flight(self) -> int: ...

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.limit

    # ---- JIT compilation of buckets (optional) -------------------------------------------------
    def compile(self, bucket: Bucket, num_units: int) -> None:
        """Start compiling ``bucket`` (``num_units`` units) in the background; ``compiled()`` reports the end.

        A backend without a compiler reports a failure at once, so the bucket stays on the slow path.
        """
        self._done_compiles.append(CompileResult(bucket, False, 0.0, f"{type(self).__name__} has no JIT compiler"))

    def compiled(self) -> list[CompileResult]:
        """Compilations that ended since the last call."""
        out, self._done_compiles = self._done_compiles, []
        return out

    def healthy(self) -> bool:
        """Run a minimal batch on the device (a probe) and say whether it worked.

        The engine asks after steps keep failing, to tell requests that break a step from a
        device that is lost. A backend with nothing to probe is healthy.
        """
        return True

    def close(self) -> None:  # pragma: no cover - trivial default
        pass


class BatchExecutor(Protocol):
    """Executes one batch synchronously (the model runner of the torch backend).

    An executor that can compile also has ``compile_bucket(bucket, num_units)``: it compiles
    and warms the bucket's graph, raising on failure; ``execute`` then runs batches whose
    ``bucket`` is set on that graph.
    """

    def execute(self, batch: Batch) -> StepResult: ...


class ThreadedQueue(ExecutionQueue):
    """Runs batches one after another on a worker thread, in submission order.

    The torch backend: the executor is a model runner on ``cpu`` or ``cuda:N``. Start and end
    times come from the injected clock (the wall clock for real hardware).
    """

    def __init__(self, executor: BatchExecutor, limit: int = 1, clock: Callable[[], float] | None = None,
                 compile_workers: int = 1):
        super().__init__(limit)
        import threading
        import time

        self._executor = executor
        self._clock = clock or time.monotonic
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hal-exec")
        self._futures: collections.deque[Future[StepResult]] = collections.deque()
        self._compile_pool: ThreadPoolExecutor | None = None
        self._compile_workers = compile_workers
        self._compile_lock = threading.Lock()

    def compile(self, bucket: Bucket, num_units: int) -> None:
        compile_bucket = getattr(self._executor, "compile_bucket", None)
        if compile_bucket is None:
            return super().compile(bucket, num_units)
        if self._compile_pool is None:
            self._compile_pool = ThreadPoolExecutor(self._compile_workers, thread_name_prefix="hal-jit")

        def run() -> None:
            import time

            t0 = time.perf_counter()
            try:
                compile_bucket(bucket, num_units)
                res = CompileResult(bucket, True, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - a failed compilation disables its bucket, serving goes on
                res = CompileResult(bucket, False, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
            with self._compile_lock:
                self._done_compiles.append(res)

        self._compile_pool.submit(run)

    def compiled(self) -> list[CompileResult]:
        with self._compile_lock:
            return super().compiled()

    def healthy(self) -> bool:
        """The executor's ``probe()`` (one tiny batch), run in turn with the batches; True when it has none."""
        probe = getattr(self._executor, "probe", None)
        if probe is None:
            return True
        try:
            self._pool.submit(probe).result()
            return True
        except Exception:  # noqa: BLE001 - the answer is the point
            return False

    def _run(self, batch: Batch) -> StepResult:
        start = self._clock()
        result = self._executor.execute(batch)
        result.step_id = batch.step_id
        result.started_at = start
        result.finished_at = self._clock()
        return result

    def submit(self, batch: Batch) -> None:
        if len(self._futures) >= self.limit:
            raise QueueFullError(f"{len(self._futures)} batches in flight; npu_queue_limit={self.limit}")
        self._futures.append(self._pool.submit(self._run, batch))

    def wait(self) -> StepResult:
        if not self._futures:
            raise RuntimeError("wait() with no batch in flight")
        fut = self._futures[0]
        try:
            return fut.result()
        finally:
            self._futures.popleft()

    @property
    def in_flight(self) -> int:
        return len(self._futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._compile_pool is not None:
            self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._futures.clear()

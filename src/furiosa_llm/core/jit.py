"""JIT compilation policy for batch buckets. No torch: it decides, a backend compiles.

A decode step's shape maps to a bucket: its batch size and its longest context, each rounded
up to a bucket edge. A bucket moves through COUNTING (seen, not yet compiled), QUEUED (seen
``threshold`` times, waiting for a worker), COMPILING, and READY or FAILED. At most
``max_workers`` buckets compile at once; a bucket compiles as ceil(layers / ``unit_size``)
units of ``unit_size`` layers each. A step whose bucket is not READY runs on the backend's
slow path (uncompiled), so serving never waits for a compiler; a FAILED bucket stays on the
slow path for good and its error is logged.

Only decode-only steps (every sequence computes one token) are bucketed; prefill and mixed
steps always take the slow path.
"""

from __future__ import annotations

import bisect
import collections
import enum
import logging
import math
from dataclasses import dataclass

from furiosa_llm.hal import Batch, Bucket

from .config import JitConfig

logger = logging.getLogger("furiosa_llm")


class BucketState(enum.Enum):
    COUNTING = "counting"
    QUEUED = "queued"
    COMPILING = "compiling"
    READY = "ready"
    FAILED = "failed"


@dataclass(slots=True)
class JitStats:
    steps_compiled: int = 0  # decode steps that ran on a READY bucket
    steps_slow: int = 0  # bucketable steps that ran on the slow path
    steps_unbucketed: int = 0  # prefill/mixed steps, or shapes beyond the largest edge
    compilations_started: int = 0
    compilations_finished: int = 0
    compilations_failed: int = 0
    compile_seconds_total: float = 0.0
    first_ready_at: float | None = None  # clock time the first bucket became ready

    @property
    def hit_rate(self) -> float:
        """Share of bucketable steps that ran compiled."""
        n = self.steps_compiled + self.steps_slow
        return self.steps_compiled / n if n else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__slots__}
        d["hit_rate"] = self.hit_rate
        return d


@dataclass(slots=True)
class _Entry:
    state: BucketState = BucketState.COUNTING
    hits: int = 0
    error: str | None = None


class JitPolicy:
    def __init__(self, config: JitConfig, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers}: must be >= 1")
        self.config = config
        self.num_layers = num_layers
        self.buckets: dict[Bucket, _Entry] = {}
        self.queue: collections.deque[Bucket] = collections.deque()
        self.stats = JitStats()

    @property
    def num_units(self) -> int:
        """Compile units per bucket: ``unit_size`` layers compiled together."""
        return math.ceil(self.num_layers / self.config.unit_size)

    @property
    def compiling(self) -> int:
        return sum(1 for e in self.buckets.values() if e.state is BucketState.COMPILING)

    def state(self, bucket: Bucket) -> BucketState | None:
        e = self.buckets.get(bucket)
        return None if e is None else e.state

    def bucket_of(self, batch: Batch) -> Bucket | None:
        seqs = batch.sequences
        if not seqs or any(len(s.token_ids) != 1 for s in seqs):
            return None
        be, le = self.config.batch_edges, self.config.length_edges
        i = bisect.bisect_left(be, len(seqs))
        j = bisect.bisect_left(le, max(s.context_len for s in seqs))
        if i == len(be) or j == len(le):
            return None
        return Bucket(be[i], le[j])

    def observe(self, batch: Batch) -> Bucket | None:
        """Count one step of ``batch``'s bucket; returns the bucket when it is READY (run compiled)."""
        bucket = self.bucket_of(batch)
        if bucket is None:
            self.stats.steps_unbucketed += 1
            return None
        entry = self.buckets.get(bucket)
        if entry is None:
            entry = self.buckets[bucket] = _Entry()
        entry.hits += 1
        if entry.state is BucketState.READY:
            self.stats.steps_compiled += 1
            return bucket
        self.stats.steps_slow += 1
        if entry.state is BucketState.COUNTING and entry.hits >= self.config.threshold:
            entry.state = BucketState.QUEUED
            self.queue.append(bucket)
        return None

    def start(self) -> list[Bucket]:
        """Buckets to start compiling now (queued ones, while fewer than ``max_workers`` compile)."""
        started = []
        room = self.config.max_workers - self.compiling
        while self.queue and room > 0:
            bucket = self.queue.popleft()
            self.buckets[bucket].state = BucketState.COMPILING
            self.stats.compilations_started += 1
            started.append(bucket)
            room -= 1
        return started

    def end_compilation(self, bucket: Bucket, ok: bool, seconds: float, now: float, error: str | None = None) -> None:
        """A backend reports a compilation's end."""
        entry = self.buckets.get(bucket)
        if entry is None or entry.state is not BucketState.COMPILING:
            raise RuntimeError(f"bucket {bucket}: finished but was not compiling ({entry and entry.state})")
        self.stats.compile_seconds_total += seconds
        if ok:
            entry.state = BucketState.READY
            self.stats.compilations_finished += 1
            if self.stats.first_ready_at is None:
                self.stats.first_ready_at = now
        else:
            entry.state = BucketState.FAILED
            entry.error = error
            self.stats.compilations_failed += 1
            logger.warning("JIT compilation of bucket %s failed; it stays on the slow path: %s", bucket, error)


"""The engine core: requests, the KV block allocator, the scheduler, the JIT policy. Imports no torch."""

from .block_allocator import BlockAllocator, BlockTable
from .config import EngineConfig, JitConfig, SchedulerConfig, resolve_max_model_len
from .engine_core import EngineCore
from .jit import BucketState, JitPolicy, JitStats
from .metrics import EngineStats, RequestMetrics, SchedulerStats
from .request import Request, RequestStatus
from .scheduler import CoreOutput, Scheduler

__all__ = [
    "BlockAllocator", "BlockTable", "BucketState", "CoreOutput", "EngineConfig", "EngineCore", "EngineStats",
    "JitConfig", "JitPolicy", "JitStats", "Request", "RequestMetrics", "RequestStatus", "Scheduler",
    "SchedulerConfig", "SchedulerStats", "resolve_max_model_len",
]

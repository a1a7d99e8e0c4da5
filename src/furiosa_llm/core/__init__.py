"""The engine core: requests, the KV block allocator, the scheduler, the JIT policy. Imports no torch."""

from .block_allocator import BlockAllocator
from .engine_core import EngineCore
from .jit import BucketState, JitConfig, JitPolicy, JitStats
from .request import Request, RequestStatus
from .scheduler import CoreOutput, Scheduler, SchedulerConfig

__all__ = ["BlockAllocator", "BucketState", "CoreOutput", "EngineCore", "JitConfig", "JitPolicy", "JitStats", "Request", "RequestStatus", "Scheduler", "SchedulerConfig"]

"""The engine core: requests, the KV block allocator, the scheduler. Imports no torch."""

from .block_allocator import BlockAllocator
from .engine_core import EngineCore
from .request import Request, RequestStatus
from .scheduler import CoreOutput, Scheduler, SchedulerConfig

__all__ = ["BlockAllocator", "CoreOutput", "EngineCore", "Request", "RequestStatus", "Scheduler", "SchedulerConfig"]

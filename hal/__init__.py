"""Hardware abstraction layer: device strings, the execution queue and its backends."""

from .batch import Batch, Bucket, CompileResult, SamplingSettings, SequenceChunk, StepResult, TokenLogprob
from .devices import CoreRange, Device, format_devices, parse_device, parse_devices
from .queue import BatchExecutor, ExecutionQueue, QueueFullError, ThreadedQueue

__all__ = [
    "Batch",
    "BatchExecutor",
    "Bucket",
    "CompileResult",
    "CoreRange",
    "Device",
    "ExecutionQueue",
    "QueueFullError",
    "SamplingSettings",
    "SequenceChunk",
    "StepResult",
    "ThreadedQueue",
    "TokenLogprob",
    "format_devices",
    "parse_device",
    "parse_devices",
]

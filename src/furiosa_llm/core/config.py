"""The core's configuration: the scheduler's knobs, the JIT policy's knobs, and both together.

Every backend gets these from one place, ``EngineArgs.engine_config`` (``api``); the core
only validates them. ``resolve_max_model_len`` is the one rule for the context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BATCH_EDGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LENGTH_EDGES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass(slots=True)
class SchedulerConfig:
    """Knobs of one ``Scheduler`` (one replica).

    ``num_blocks`` KV blocks of ``block_size`` tokens; at most ``max_num_batched_tokens``
    tokens per step (chunked prefill) and ``max_processing_samples`` running requests;
    ``spare_blocks_ratio`` of the blocks kept free when admitting; requests end at
    ``max_model_len`` tokens (prompt + output). ``num_batch_slots`` > 1 splits the running requests
    among that many batches in flight (vLLM's virtual engines: a request belongs to one slot, a slot
    has one batch in flight; the batches take the slots in turn), so a pipeline of that many stages
    stays full (``EngineArgs`` gives ``min(npu_queue_limit, pipeline_parallel_size)``); with 1, a
    batch takes every running request not already in flight. ``max_processing_samples`` caps each
    slot.
    """

    num_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_processing_samples: int = 65536
    spare_blocks_ratio: float = 0.0
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    num_batch_slots: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.num_batch_slots, int) or self.num_batch_slots < 1:
            raise ValueError(f"num_batch_slots={self.num_batch_slots!r}: must be an int >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens}: must be >= 1")
        if self.max_processing_samples < 1:
            raise ValueError(f"max_processing_samples={self.max_processing_samples}: must be > 0")
        if not 0.0 <= self.spare_blocks_ratio < 1.0:
            raise ValueError(f"spare_blocks_ratio={self.spare_blocks_ratio}: must be in [0, 1)")


@dataclass(slots=True)
class JitConfig:
    """Knobs of the JIT compile policy (``jit.py``); the ``jit_*`` engine arguments."""

    enabled: bool = False
    threshold: int = 5
    max_workers: int = 15
    unit_size: int = 8
    batch_edges: tuple[int, ...] = BATCH_EDGES
    length_edges: tuple[int, ...] = LENGTH_EDGES

    def __post_init__(self) -> None:
        for name, lo in (("jit_threshold", 1), ("jit_max_workers", 1), ("jit_unit_size", 2)):
            v = getattr(self, name.removeprefix("jit_"))
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name}={v!r}: must be an int >= {lo}")
        for name in ("batch_edges", "length_edges"):
            edges = getattr(self, name)
            if not edges or list(edges) != sorted(set(edges)) or edges[0] < 1:
                raise ValueError(f"{name}={edges!r}: must be increasing positive ints")


@dataclass(slots=True)
class EngineConfig:
    """What one ``EngineCore`` needs: its scheduler's and JIT policy's knobs and the queue depth."""

    scheduler_config: SchedulerConfig
    jit_config: JitConfig = field(default_factory=JitConfig)
    npu_queue_limit: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.npu_queue_limit, int) or self.npu_queue_limit < 1:
            raise ValueError(f"npu_queue_limit={self.npu_queue_limit!r}: must be an int >= 1")


def resolve_max_model_len(requested: int | None, model_max: int | None, num_blocks: int, block_size: int) -> int:
    """The context length (prompt + output tokens) of every backend.

    The requested length (``--max-model-len``; None means the model's), capped by the model's
    ``max_position_embeddings`` (2048 when the model does not say) and by what the KV cache of
    one replica holds (``num_blocks * block_size``).
    """
    model_max = model_max or 2048
    return min(requested or model_max, model_max, num_blocks * block_size)

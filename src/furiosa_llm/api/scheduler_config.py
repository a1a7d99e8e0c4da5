"""The public ``SchedulerConfig`` of Furiosa-LLM (``from furiosa_llm.api import SchedulerConfig``).

A user-facing dataclass with the fields and defaults Furiosa-LLM documents, passed as
``LLM(..., scheduler_config=...)``; ``EngineArgs.create_scheduler_config()`` builds one from engine
arguments. It is not the core's ``furiosa_llm.core.config.SchedulerConfig`` (the scheduler's
internal knobs, built by ``EngineArgs.engine_config``): ``engine_kwargs_from_scheduler_config``
folds this one into ``EngineArgs`` keyword arguments, the one path to the core.

What each field means here:

- ``npu_queue_limit``: batches submitted to a device and not yet completed (``--npu-queue-limit``).
- ``max_processing_samples``: the most requests in the running set (``--max-processing-samples``).
- ``spare_blocks_ratio``: the share of KV blocks kept free at admission (``--spare-blocks-ratio``).
- ``prefill_chunk_size``: a prompt is prefilled in chunks of at most this many tokens; here that
  is the step's token budget, ``--max-num-batched-tokens`` (None: the engine's, 2048). This engine
  always prefills in chunks, so None does not turn chunking off.
- ``enable_prefix_caching``: ``--enable-prefix-caching``; None leaves the engine's setting (on).
- ``is_offline``, ``scheduler_kind``, ``estimation_time_limit_ms``: strategy hints of Furiosa's
  scheduler. This engine has one scheduling strategy, so they are accepted, validated and
  ignored (a warning names the ones set); ``is_offline=True`` sets ``scheduler_kind="offline"``
  as in Furiosa-LLM.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("furiosa_llm")

_IGNORED = ("is_offline", "scheduler_kind", "estimation_time_limit_ms")
"""Fields with no meaning on this engine (one scheduling strategy): accepted and ignored."""


def _int_at_least(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r:.80}: must be an int >= {minimum}" + (" or None" if optional else ""))
    return int(value)


@dataclass
class SchedulerConfig:
    """Scheduler settings of one engine, with Furiosa-LLM's names and defaults.

    A value of the wrong type or out of range is a ``ValueError`` naming the field. Equality
    compares ``spare_blocks_ratio`` to within 1e-6, as Furiosa-LLM's does.
    """

    npu_queue_limit: int = 2
    max_processing_samples: int = 65536
    spare_blocks_ratio: float = 0.0
    is_offline: bool = False
    prefill_chunk_size: int | None = None
    scheduler_kind: str | None = None
    estimation_time_limit_ms: int | None = None
    enable_prefix_caching: bool | None = None

    def __post_init__(self) -> None:
        self.npu_queue_limit = _int_at_least("npu_queue_limit", self.npu_queue_limit, 1)
        self.max_processing_samples = _int_at_least("max_processing_samples", self.max_processing_samples, 1)
        r = self.spare_blocks_ratio
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 <= float(r) < 1.0:
            raise ValueError(f"spare_blocks_ratio={r!r:.80}: must be a number in [0, 1)")
        self.spare_blocks_ratio = float(r)
        if not isinstance(self.is_offline, bool):
            raise ValueError(f"is_offline={self.is_offline!r:.80}: must be True or False")
        self.prefill_chunk_size = _int_at_least("prefill_chunk_size", self.prefill_chunk_size, 1, optional=True)
        if self.scheduler_kind is not None and not isinstance(self.scheduler_kind, str):
            raise ValueError(f"scheduler_kind={self.scheduler_kind!r:.80}: must be a str or None")
        self.estimation_time_limit_ms = _int_at_least("estimation_time_limit_ms", self.estimation_time_limit_ms, 0,
                                                      optional=True)
        if self.enable_prefix_caching is not None and not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching={self.enable_prefix_caching!r:.80}: must be True, False or None")
        if self.is_offline:
            self.scheduler_kind = "offline"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SchedulerConfig):
            return NotImplemented
        return (
            abs(self.spare_blocks_ratio - other.spare_blocks_ratio) < 1e-6
            and all(getattr(self, f) == getattr(other, f) for f in _FIELDS if f != "spare_blocks_ratio")
        )

    __hash__ = None  # mutable, like the dataclass it is

    def ignored_fields(self) -> list[str]:
        """The fields set away from their default that this engine does not use."""
        return [f for f in _IGNORED if getattr(self, f) != _DEFAULTS[f]]


_FIELDS = tuple(SchedulerConfig.__dataclass_fields__)
_DEFAULTS = {name: f.default for name, f in SchedulerConfig.__dataclass_fields__.items()}

_ENGINE_KNOBS = {
    "npu_queue_limit": "npu_queue_limit",
    "max_processing_samples": "max_processing_samples",
    "spare_blocks_ratio": "spare_blocks_ratio",
    "prefill_chunk_size": "max_num_batched_tokens",
    "enable_prefix_caching": "enable_prefix_caching",
}
"""SchedulerConfig field -> the EngineArgs keyword it sets (a None value sets nothing)."""


def engine_kwargs_from_scheduler_config(scheduler_config: SchedulerConfig | None,
                                        engine_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``engine_kwargs`` (``EngineArgs`` keyword arguments) with ``scheduler_config`` folded in.

    Returns a new dict; ``scheduler_config=None`` returns a copy of ``engine_kwargs`` unchanged.
    A knob given both ways with different values (``npu_queue_limit=4`` beside a
    ``SchedulerConfig(npu_queue_limit=2)``) is a ``ValueError`` naming both. Fields this engine
    does not use (``is_offline``, ``scheduler_kind``, ``estimation_time_limit_ms``) are logged
    as ignored.
    """
    out = dict(engine_kwargs or {})
    if scheduler_config is None:
        return out
    if not isinstance(scheduler_config, SchedulerConfig):
        raise ValueError(
            f"scheduler_config={scheduler_config!r:.80}: expected a furiosa_llm.api.SchedulerConfig or None"
        )
    for field_name, kw in _ENGINE_KNOBS.items():
        value = getattr(scheduler_config, field_name)
        if value is None:
            continue
        given = out.get(kw)
        if given is not None and given != value:
            raise ValueError(
                f"{kw}={given!r}: conflicts with scheduler_config.{field_name}={value!r}; give it one way only"
            )
        out[kw] = value
    ignored = scheduler_config.ignored_fields()
    if ignored:
        logger.warning("scheduler_config: %s accepted and ignored (this engine has one scheduling strategy)",
                       ", ".join(f"{f}={getattr(scheduler_config, f)!r}" for f in ignored))
    return out

"""One data-parallel engine replica: the unchanged ``NativeEngine`` inside a Ray actor.

``EngineReplica`` is a plain class; ``data_parallel.py`` makes it a Ray actor (threaded, so
``add_request`` and ``abort_request`` run while a ``step`` does, as ``NativeEngine`` allows under
its core lock). The actor owns its device, its model weights and its KV cache; the front
(``DataParallelEngine``) drives it through the methods below and nothing else.
"""

from __future__ import annotations

import logging
from typing import Any

from .engine_args import EngineArgs

logger = logging.getLogger("furiosa_llm")


class EngineReplica:
    """``NativeEngine(args)`` on one device, with ``num_threads`` torch threads (None: torch's default)."""

    def __init__(self, args: EngineArgs, index: int, num_threads: int | None = None) -> None:
        if num_threads is not None:
            import torch

            torch.set_num_threads(num_threads)
        from .native_engine import NativeEngine

        self.index = index
        self.engine = NativeEngine(args)

    def info(self) -> dict[str, Any]:
        """What the front needs to stand for the replicas: tokenizer, limits, sampling defaults, config."""
        e = self.engine
        return {"tokenizer": e.tokenizer, "max_model_len": e.max_model_len, "vocab_size": e.vocab_size,
                "eos_token_ids": e.eos_token_ids, "task": e.task, "hidden_size": e.hidden_size,
                "pooling_config": e.pooling_config, "default_sampling_kwargs": e.default_sampling_kwargs,
                "engine_config": e.engine_config, "device": str(e.backend.device), "load_seconds": e.load_seconds}

    def ping(self) -> int:
        return self.index

    def add_request(self, request_id: str, prompt, params, arrival_time: float | None) -> None:
        self.engine.add_request(request_id, prompt, params, arrival_time)

    def add_pooling_request(self, request_id: str, prompt, params, truncate_prompt_tokens: int | None,
                            arrival_time: float | None) -> None:
        self.engine.add_pooling_request(request_id, prompt, params, truncate_prompt_tokens=truncate_prompt_tokens,
                                        arrival_time=arrival_time)

    def abort_request(self, request_ids: list[str]) -> list:
        return self.engine.abort_request(request_ids)

    def step(self) -> tuple[list, Any]:
        """One engine step when there is work (else none): its outputs and the core's stats after it."""
        outs = self.engine.step() if self.engine.has_unfinished_requests() else []
        return outs, self.engine.stats()

    def stats(self):
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

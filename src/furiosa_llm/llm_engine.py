"""``furiosa_llm.llm_engine``: ``LLMEngine`` and ``AsyncLLMEngine``, at Furiosa-LLM's module path.

The engines load on first use (``__getattr__``), so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LLMEngine": "furiosa_llm.api.llm_engine",
    "AsyncLLMEngine": "furiosa_llm.api.async_llm_engine",
    "EngineArgs": "furiosa_llm.api.engine_args",
    "AsyncEngineArgs": "furiosa_llm.api.engine_args",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'furiosa_llm.llm_engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from .api.async_llm_engine import AsyncLLMEngine
    from .api.engine_args import AsyncEngineArgs, EngineArgs
    from .api.llm_engine import LLMEngine

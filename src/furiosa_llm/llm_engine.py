"""``furiosa_llm.llm_engine``: ``LLMEngine`` and ``AsyncLLMEngine``, at Furiosa-LLM's module path.

The engines load on first use (``__getattr__``), so importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .api._lazy import lazy_exports

_EXPORTS = {
    "LLMEngine": "furiosa_llm.api.llm_engine",
    "AsyncLLMEngine": "furiosa_llm.api.async_llm_engine",
    "EngineArgs": "furiosa_llm.api.engine_args",
    "AsyncEngineArgs": "furiosa_llm.api.engine_args",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    from .api.async_llm_engine import AsyncLLMEngine
    from .api.engine_args import AsyncEngineArgs, EngineArgs
    from .api.llm_engine import LLMEngine

"""Modules whose public names load on first use, so importing them stays cheap (no torch, no transformers)."""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(module: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``module``: each name in ``exports`` (name -> defining module)
    is imported when first read, then kept in the module's namespace."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[module], name, value)
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[module])) | set(exports))

    return __getattr__, __dir__

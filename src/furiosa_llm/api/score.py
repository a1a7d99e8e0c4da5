"""Scoring text pairs on an embedding model: the pairing rule and the score (vLLM's ``LLM.score`` semantics).

An embedding model scores a pair by the cosine similarity of the two texts' embeddings (vLLM's
"embedding similarity" scoring; a cross-encoder, which reads both texts at once, is not available
offline here). ``pairs(data_1, data_2)`` applies vLLM's rule: one text against each of a list
(1:N), or two lists of the same length pairwise (N:N). ``LLM.score`` and the server's ``/score``
and ``/rerank`` share this module.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def as_list(data: Any, name: str) -> list:
    """``data`` (a str, a prompt dict, or a list of them) as a non-empty list; ``ValueError`` naming ``name``."""
    items = [data] if isinstance(data, (str, dict)) else list(data) if isinstance(data, (list, tuple)) else None
    if not items:
        raise ValueError(f"{name}={data!r:.80}: expected a str, a prompt dict, or a non-empty list of them")
    return items


def pairs(data_1: Any, data_2: Any) -> list[tuple[int, int]]:
    """Index pairs into ``(as_list(data_1), as_list(data_2))``: 1:N when ``data_1`` has one item, else N:N.

    ``ValueError`` when both are lists of different lengths (vLLM's rule).
    """
    a, b = as_list(data_1, "text_1"), as_list(data_2, "text_2")
    if len(a) == 1:
        return [(0, j) for j in range(len(b))]
    if len(a) != len(b):
        raise ValueError(f"text_1 has {len(a)} items and text_2 {len(b)}: give one text_1, or as many as text_2")
    return [(i, i) for i in range(len(a))]


def cosine(u: Sequence[float], v: Sequence[float]) -> float:
    """The cosine similarity of two vectors of the same length (0.0 when one is zero)."""
    dot = sum(x * y for x, y in zip(u, v))
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(y * y for y in v))
    return dot / (nu * nv) if nu > 0 and nv > 0 else 0.0

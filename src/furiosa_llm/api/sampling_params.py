"""SamplingParams and RequestOutputKind, with the validation of Furiosa-LLM / vLLM."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

from furiosa_llm.hal import SamplingSettings


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # the whole output so far, every step
    DELTA = 1  # only what is new since the last output
    FINAL = 2  # one output, when the request finishes


def _num(name: str, value: Any, *, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected {'an int' if integer else 'a number'}")


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _num("n", self.n, integer=True)
        if self.n != 1:
            raise ValueError(f"n={self.n}: only n=1 is supported")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _num(name, getattr(self, name))
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (below 1e-5 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        _num("top_k", self.top_k, integer=True)
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k}: must be -1 or 0 (off) or >= 1")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p}: must be in [0, 1]")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be in (0, 2]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [-2, 2]")
        if self.seed is not None:
            _num("seed", self.seed, integer=True)
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop] if self.stop else []
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop = [s for s in self.stop if s]
        else:
            raise ValueError(f"stop={self.stop!r}: expected a string or a list of strings")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r}: expected a list of non-negative ints")
        else:
            self.stop_token_ids = list(self.stop_token_ids)
        if self.max_tokens is not None:
            _num("max_tokens", self.max_tokens, integer=True)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens={self.max_tokens}: must be >= 1 (or None to fill the context)")
        _num("min_tokens", self.min_tokens, integer=True)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens}: must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens}: must be <= max_tokens={self.max_tokens}")
        if self.logprobs is not None:
            _num("logprobs", self.logprobs, integer=True)
            if self.logprobs < 0:
                raise ValueError(f"logprobs={self.logprobs}: must be >= 0")
        if self.prompt_logprobs is not None:
            _num("prompt_logprobs", self.prompt_logprobs, integer=True)
            if self.prompt_logprobs < -1:
                raise ValueError(f"prompt_logprobs={self.prompt_logprobs}: must be >= 0, or -1 for the whole vocabulary")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind={self.output_kind!r}: expected a RequestOutputKind")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def settings(self, eos_token_ids: frozenset[int] = frozenset()) -> SamplingSettings:
        """The backend's view of these parameters: the fields ``SamplingSettings`` shares with them, by name.

        ``stop_token_ids`` becomes every id masked until ``min_tokens`` outputs exist: these
        ``stop_token_ids`` and, unless ``ignore_eos``, the model's ``eos_token_ids``.
        """
        kw = {name: getattr(self, name) for name in _SHARED_FIELDS}
        kw["stop_token_ids"] = frozenset(self.stop_token_ids or ()) | (frozenset() if self.ignore_eos else eos_token_ids)
        return SamplingSettings(**kw)


_SHARED_FIELDS = tuple(f.name for f in fields(SamplingSettings) if f.name != "stop_token_ids")

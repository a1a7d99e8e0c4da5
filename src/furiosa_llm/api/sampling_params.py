"""SamplingParams and RequestOutputKind, with the validation of Furiosa-LLM / vLLM."""

from __future__ import annotations

import copy
import enum
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

from furiosa_llm.hal import SamplingSettings

from .structured_outputs import StructuredOutputsParams


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # the whole output so far, every step
    DELTA = 1  # only what is new since the last output
    FINAL = 2  # one output, when the request finishes


class SamplingType(enum.IntEnum):
    """How the next token is chosen (vLLM's enum): ``SamplingParams.sampling_type``."""

    GREEDY = 0  # temperature below 1e-5: the most likely token
    RANDOM = 1  # sampled from the engine's generator
    RANDOM_SEED = 2  # sampled from the request's own generator (``seed`` given)


_SAMPLING_EPS = 1e-5
"""A temperature below this is greedy; a ``length_penalty`` within this of 1.0 is the default."""


_MAX_TEMPERATURE = 1e6
"""Above this every token is about equally likely; far above, the float32 division gives inf and NaN."""
_MIN_REPETITION_PENALTY = 1e-6
"""Below this, dividing a logit by the penalty can overflow float32 (inf logits, NaN probabilities)."""


_INT64 = (-(2**63), 2**63 - 1)


def _show(value: Any) -> str:
    """``repr`` for an error message, short, also for an int too long to print."""
    try:
        return f"{value!r:.80}"
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        if isinstance(value, int):
            return f"<an int of {value.bit_length()} bits>"
        return f"<a {type(value).__name__} holding an int too long to print>"


def _int(name: str, value: Any, lo: int = _INT64[0], hi: int = _INT64[1]) -> int:
    """``value`` as an int in ``[lo, hi]`` (default: int64): any integral number but a bool (numpy ints too).

    Counts are bounded by the model or engine later (``verify``, ``max_model_len``); the int64
    range here keeps every value printable and fit for a tensor.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={_show(value)}: expected an int")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={_show(value)}: must be an int in [{lo}, {hi}]")
    return int(value)


def _float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hint: str = "") -> float:
    """``value`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), else a ValueError."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={_show(value)}: expected a number in {interval}")
    try:
        x = float(value)
    except (OverflowError, ValueError):  # an int too large for a float, an odd Real
        x = math.nan
    if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        raise ValueError(f"{name}={_show(value)}: must be a finite number in {interval}{hint}")
    return x


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={_show(value)}: expected True or False")
    return value


@dataclass(kw_only=True)
class SamplingParams:
    """Sampling parameters of one request, with vLLM's names, defaults and meaning.

    Construction rejects a value of the wrong type, NaN, an infinity or a value out of range
    with a ``ValueError`` that names the argument, the value and what is allowed. Bounds that
    depend on the model or the engine (vocabulary size, ``max_logprobs``, ``max_model_len``) are
    checked when the request is added (``verify`` and ``LLMEngine.add_request``).
    """

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
    extra_args: dict[str, Any] | None = field(default_factory=dict)
    structured_outputs: StructuredOutputsParams | None = None
    # the 2026.2-era beam-search fields (vLLM <= 0.6): accepted with their validation; beam search
    # itself is not supported (one sequence per request), so use_beam_search=True is a ValueError
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        self._check_fields()

    @classmethod
    def from_optional(cls, **kwargs: Any) -> "SamplingParams":
        """``SamplingParams(**kwargs)`` where a keyword given as None takes its default.

        As in Furiosa-LLM and vLLM, ``max_tokens=None`` keeps its meaning (fill the context),
        and so do the fields whose default is None. An unknown keyword is a ``TypeError``.
        """
        defaults = {f.name: f for f in fields(cls)}
        unknown = sorted(set(kwargs) - set(defaults))
        if unknown:
            raise TypeError(f"SamplingParams.from_optional() got unexpected keyword arguments: {', '.join(unknown)}")
        kw = {name: value for name, value in kwargs.items() if value is not None or name in _NONE_IS_A_VALUE}
        return cls(**kw)

    def clone(self) -> "SamplingParams":
        """A deep copy: changing the copy (its stop list, ``extra_args``) leaves this one as it is."""
        return copy.deepcopy(self)

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    def _check_fields(self) -> None:
        """Type and range of every field on its own; normalises (floats, ints, stop lists). Idempotent."""
        self.n = _int("n", self.n)
        if self.n != 1:
            raise ValueError(f"n={self.n}: must be 1 (one output per request is supported)")
        self.temperature = _float("temperature", self.temperature, 0.0, _MAX_TEMPERATURE,
                                  hint=" (below 1e-5 means greedy)")
        self.top_p = _float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        self.top_k = _int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k}: must be -1 or 0 (off) or >= 1")
        self.min_p = _float("min_p", self.min_p, 0.0, 1.0)
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty, _MIN_REPETITION_PENALTY, 2.0)
        self.presence_penalty = _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            # what torch.Generator.manual_seed accepts; negative seeds too (the sampler mixes the
            # seed with the token index into [0, 2**63) first)
            self.seed = _int("seed", self.seed, -(2**63), 2**64 - 1)
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop] if self.stop else []
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop = [s for s in self.stop if s]
        else:
            raise ValueError(f"stop={_show(self.stop)}: expected a string or a list of strings")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t <= _INT64[1] for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids={_show(self.stop_token_ids)}: expected a list of non-negative ints in int64")
        else:
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            _bool(name, getattr(self, name))
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens={self.max_tokens}: must be >= 1 (or None to fill the context)")
        self.min_tokens = _int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens}: must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens}: must be <= max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if isinstance(value, bool):  # vLLM's and Furiosa-LLM's reading: True is 1, False is 0 (bool is an int)
                value = int(value)
            if value is not None:
                value = _int(name, value)
                if value < -1:
                    raise ValueError(f"{name}={value}: must be >= 0, or -1 for the whole vocabulary")
                setattr(self, name, value)
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind={_show(self.output_kind)}: expected a RequestOutputKind")
        if self.extra_args is None:
            self.extra_args = {}
        elif not isinstance(self.extra_args, dict):
            raise ValueError(f"extra_args={_show(self.extra_args)}: expected a dict or None")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs={_show(self.structured_outputs)}: expected a StructuredOutputsParams or None")
        self._check_beam_fields()

    def _check_beam_fields(self) -> None:
        """``best_of``, ``use_beam_search``, ``length_penalty``, ``early_stopping``: Furiosa-LLM 2026.2's rules.

        ``best_of`` None means ``n``; it may not be below ``n``, and above 1 it needs beam search
        (one sequence is generated per request). Without beam search ``length_penalty`` must be
        1.0 and ``early_stopping`` False (they would have no effect). Beam search is not supported.
        """
        if self.best_of is None:
            self.best_of = self.n
        self.best_of = _int("best_of", self.best_of)
        if self.best_of < self.n:
            raise ValueError(f"best_of={self.best_of}: must be >= n={self.n}")
        _bool("use_beam_search", self.use_beam_search)
        self.length_penalty = _float("length_penalty", self.length_penalty, -_MAX_TEMPERATURE, _MAX_TEMPERATURE)
        if not (isinstance(self.early_stopping, bool) or (isinstance(self.early_stopping, str) and self.early_stopping == "never")):
            raise ValueError(f"early_stopping={_show(self.early_stopping)}: must be True, False or 'never'")
        if self.use_beam_search:
            raise ValueError(
                "use_beam_search=True: must be False; beam search is not supported by this engine "
                "(use greedy decoding, temperature=0, or sampling)"
            )
        if self.best_of > 1:
            raise ValueError(
                f"best_of={self.best_of}: must be 1 (or None); more candidates than n need beam search, "
                "which is not supported (one sequence is generated per request)"
            )
        if abs(self.length_penalty - 1.0) > _SAMPLING_EPS:
            raise ValueError(f"length_penalty={self.length_penalty:g}: must be 1.0 without beam search (it has no effect)")
        if self.early_stopping is not False:
            raise ValueError(f"early_stopping={_show(self.early_stopping)}: must be False without beam search (it has no effect)")

    def verify(self, *, max_logprobs: int, vocab_size: int) -> None:
        """Raise ``ValueError`` for a count above what the engine can give (vLLM's checks when a request is added).

        ``max_logprobs``: the engine's ``EngineArgs.max_logprobs`` (-1: the vocabulary size).
        ``logprobs`` and ``prompt_logprobs`` of -1 mean the whole vocabulary, so they need
        ``max_logprobs`` >= ``vocab_size`` (or -1). ``top_k`` may not exceed the vocabulary
        (vLLM's rule) and every ``stop_token_ids`` entry must be a token id of it. The fields
        are checked again first, in case they were changed after construction.
        """
        self._check_fields()
        cap = vocab_size if max_logprobs == -1 else max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            wanted = vocab_size if value == -1 else value
            if wanted is not None and wanted > cap:
                limit = f"max_logprobs={max_logprobs}" + (f" (the vocabulary size, {vocab_size})" if max_logprobs == -1 else "")
                raise ValueError(
                    f"{name}={value}: must be <= this engine's {limit}" + (f" (-1 asks for all {vocab_size})" if value == -1 else "")
                    + "; ask for fewer, or start the engine with a larger --max-logprobs (-1 allows the whole vocabulary)"
                )
        if self.top_k > vocab_size:
            raise ValueError(f"top_k={self.top_k}: must not exceed the vocabulary size {vocab_size} (-1 or 0 for all)")
        bad = [t for t in self.stop_token_ids or () if t >= vocab_size]
        if bad:
            raise ValueError(
                f"stop_token_ids={_show(self.stop_token_ids)}: must be token ids of this model, "
                f"0..{vocab_size - 1} (vocabulary size {vocab_size}); {bad[0]} is not"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def settings(self, eos_token_ids: frozenset[int] = frozenset(), structured: object = None) -> SamplingSettings:
        """The backend's view of these parameters: the fields ``SamplingSettings`` shares with them, by name.

        ``stop_token_ids`` becomes every id masked until ``min_tokens`` outputs exist: these
        ``stop_token_ids`` and, unless ``ignore_eos``, the model's ``eos_token_ids``. ``structured``:
        the request's own grammar state (``model.structured_outputs.GrammarState``) when
        ``structured_outputs`` is set.
        """
        kw = {name: getattr(self, name) for name in _SHARED_FIELDS}
        kw["stop_token_ids"] = frozenset(self.stop_token_ids or ()) | (frozenset() if self.ignore_eos else eos_token_ids)
        return SamplingSettings(**kw, structured=structured)


_SHARED_FIELDS = tuple(f.name for f in fields(SamplingSettings) if f.name not in ("stop_token_ids", "structured"))
_NONE_IS_A_VALUE = frozenset({"max_tokens"})
"""``from_optional`` keeps None for these: ``max_tokens=None`` fills the context."""

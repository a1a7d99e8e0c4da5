"""Workloads: when requests arrive and how long their prompts and outputs are.

Arrivals are Poisson or Gamma (``burstiness`` is the Gamma shape, as in vLLM's serving
benchmark: 1.0 is Poisson, lower is burstier), or the ``arrived_at`` column of a trace.
Lengths are ``N`` or ``fixed:N``, ``uniform:LO:HI``, ``lognormal:MEAN:SIGMA`` or ``trace`` (the trace's
``num_prefill_tokens`` / ``num_decode_tokens`` columns, in order).
``embed_fraction`` of the requests (chosen at random, seeded) are embedding (pooling) requests:
prefill only, no output tokens (their ``output_len`` is not used).
"""

from __future__ import annotations

import csv
import io
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)


MAX_LENGTH = 1 << 24  # tokens: far beyond any model's context, and safe in int64 sums over many requests
MAX_SIGMA = 4.0  # lognormal: at 4 the 99.99th percentile is ~e^15 x the median, already absurd for lengths


@dataclass(frozen=True, slots=True)
class LengthDist:
    kind: str  # fixed | uniform | lognormal | trace
    a: float = 0.0
    b: float = 0.0

    def __post_init__(self) -> None:
        problem = self._problem(self.kind, self.a, self.b)
        if problem:
            raise ValueError(f"{self!r}: {problem}")

    @staticmethod
    def _problem(kind: str, a: float, b: float) -> str | None:
        """What is wrong with a length distribution's values, or None (one rule for ``parse`` and the constructor)."""
        if kind not in ("fixed", "uniform", "lognormal", "trace"):
            return f"kind={kind!r}: must be fixed, uniform, lognormal or trace"
        if kind == "trace":  # the values parse gives the kinds that take fewer than two: 0
            return None if (a, b) == (0, 0) else "trace takes no values (a and b 0)"
        if kind == "fixed" and b != 0:
            return "fixed takes one value, a (b 0)"
        if not (_is_number(a) and _is_number(b)):
            return "its values must be numbers"
        # token counts: whole numbers from 1 to MAX_LENGTH; a lognormal's SIGMA from 0 to MAX_SIGMA
        counts = {"fixed": (a,), "uniform": (a, b), "lognormal": (a,)}[kind]
        if not all(1 <= v <= MAX_LENGTH and (v == int(v) or kind == "lognormal") for v in counts):
            return f"token counts must be whole numbers from 1 to {MAX_LENGTH}"
        if kind == "uniform" and a > b:
            return "LO must not exceed HI"
        if kind == "lognormal" and not 0 <= b <= MAX_SIGMA:
            return f"SIGMA must be from 0 to {MAX_SIGMA}"
        return None

    @classmethod
    def parse(cls, spec: "str | float | LengthDist", name: str = "length") -> "LengthDist":
        if isinstance(spec, LengthDist):
            return spec
        usage = f"{name}={spec!r}: expected N (fixed), fixed:N, uniform:LO:HI, lognormal:MEAN:SIGMA or trace"
        if _is_number(spec):
            spec = f"fixed:{float(spec)!r}"  # a bare count, as vLLM's --random-input-len takes it (1000.0 too)
        elif isinstance(spec, str) and ":" not in spec and spec.strip() not in ("trace", ""):
            spec = f"fixed:{spec.strip()}"  # "64", and "1e3" as "fixed:1e3" takes it
        if not isinstance(spec, str):
            raise ValueError(usage)
        kind, *vals = spec.strip().split(":")
        try:
            nums = [float(v) for v in vals]
        except ValueError:
            raise ValueError(usage) from None
        if kind == "trace" and not nums:
            return cls("trace")
        if kind not in ("fixed", "uniform", "lognormal") or len(nums) != (1 if kind == "fixed" else 2):
            raise ValueError(usage)
        problem = cls._problem(kind, *nums, *([0.0] if kind == "fixed" else []))
        if problem:
            raise ValueError(f"{usage}; {problem}")
        return cls(kind, *nums)

    def sample(self, rng: np.random.Generator, n: int, trace: np.ndarray | None = None) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(self.a), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n)
        if self.kind == "lognormal":
            mu = math.log(self.a) - self.b**2 / 2  # so that the mean is ``a``
            return np.clip(np.rint(rng.lognormal(mu, self.b, size=n)), 1, MAX_LENGTH).astype(np.int64)
        if trace is None or not len(trace):
            raise ValueError("length 'trace' needs a trace file (--trace)")
        return np.resize(trace, n).astype(np.int64)

    def __str__(self) -> str:
        if self.kind == "trace":
            return "trace"
        vals = [self.a] if self.kind == "fixed" else [self.a, self.b]
        return ":".join([self.kind, *(f"{v:g}" for v in vals)])


@dataclass(frozen=True, slots=True)
class Arrivals:
    arrived_at: np.ndarray  # seconds, non-decreasing
    input_lens: np.ndarray
    output_lens: np.ndarray
    pooling: np.ndarray | None = None  # True where the request is an embedding (pooling) request; None: none is

    def __len__(self) -> int:
        return len(self.arrived_at)


def read_trace(path: str | Path) -> np.ndarray:
    """Rows of (arrived_at, num_prefill_tokens, num_decode_tokens) from a CSV with those columns."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"trace={str(path)!r}: is a folder; give a CSV file")
    if not p.is_file():
        raise ValueError(f"trace={str(path)!r}: no such file")
    try:
        # utf-8-sig: a byte-order mark (spreadsheet exports) is dropped
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"trace={str(path)!r}: not UTF-8 text ({e.reason} at byte {e.start}); save the CSV as UTF-8") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames:
            reader.fieldnames = [name.strip() for name in reader.fieldnames]  # "arrived_at, num_prefill_tokens, ..."
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"trace={str(path)!r}: missing columns {missing}; expected {','.join(TRACE_COLUMNS)}")
        rows = []
        for i, row in enumerate(reader, start=2):
            try:
                # counts may be written as whole floats ("128.0", as spreadsheets export them)
                t, p_, d = float(row["arrived_at"]), float(row["num_prefill_tokens"]), float(row["num_decode_tokens"])
            except (TypeError, ValueError):
                raise ValueError(f"trace={str(path)!r} line {i}: expected a number in each of {TRACE_COLUMNS}") from None
            if not 0 <= t < math.inf or not all(1 <= c <= MAX_LENGTH and c == int(c) for c in (p_, d)):
                raise ValueError(f"trace={str(path)!r} line {i}: need a finite arrived_at >= 0 and token counts that are "
                                 f"whole numbers from 1 to {MAX_LENGTH}")
            rows.append((t, p_, d))
    if not rows:
        raise ValueError(f"trace={str(path)!r}: no rows")
    rows.sort(key=lambda r: r[0])
    return np.asarray(rows, dtype=float)


@dataclass(frozen=True)
class Workload:
    num_requests: int = 1000
    request_rate: float = math.inf  # requests/s; inf sends everything at t=0
    arrival: str = "poisson"  # poisson | gamma | trace
    burstiness: float = 1.0
    input_len: LengthDist = LengthDist("lognormal", 1024, 0.5)
    output_len: LengthDist = LengthDist("lognormal", 128, 0.5)
    seed: int = 0
    trace: str | None = None
    embed_fraction: float = 0.0  # share of requests that are embedding (pooling) requests: prefill only

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_len", LengthDist.parse(self.input_len, "input_len"))
        object.__setattr__(self, "output_len", LengthDist.parse(self.output_len, "output_len"))
        if not _is_int(self.num_requests) or self.num_requests < 1:
            raise ValueError(f"num_requests={self.num_requests!r}: must be an int >= 1")
        if not _is_number(self.request_rate) or not self.request_rate > 0:
            raise ValueError(f"request_rate={self.request_rate!r}: must be a number > 0 (inf sends all at once)")
        if self.arrival not in ("poisson", "gamma", "trace"):
            raise ValueError(f"arrival={self.arrival!r}: must be poisson, gamma or trace")
        if not _is_number(self.burstiness) or not 0 < self.burstiness < math.inf:
            raise ValueError(f"burstiness={self.burstiness!r}: must be a finite number > 0")
        # settings the arrival process would ignore are refused, not reported as if they had been used
        if self.burstiness != 1.0 and self.arrival != "gamma":
            raise ValueError(f"burstiness={self.burstiness!r}: only arrival='gamma' has a burstiness "
                             f"(arrival={self.arrival!r}; poisson is gamma with burstiness 1)")
        if self.arrival == "trace" and not math.isinf(self.request_rate):
            raise ValueError(f"request_rate={self.request_rate!r}: arrival='trace' takes the times of the trace; "
                             "leave the rate unset")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed!r}: must be an int in [0, 2**63)")
        if not _is_number(self.embed_fraction) or not 0.0 <= self.embed_fraction <= 1.0:
            raise ValueError(f"embed_fraction={self.embed_fraction!r}: must be a number in [0, 1]")
        uses_trace = self.arrival == "trace" or "trace" in (self.input_len.kind, self.output_len.kind)
        if uses_trace and self.trace is None:
            raise ValueError("trace=None: arrival or lengths 'trace' need a trace CSV")
        if self.trace is not None and not uses_trace:
            raise ValueError(f"trace={self.trace!r}: nothing reads it; take its times with arrival='trace' and its "
                             "lengths with input_len/output_len 'trace'")

    def with_rate(self, rate: float) -> "Workload":
        from dataclasses import replace

        return replace(self, request_rate=rate)

    def generate(self) -> Arrivals:
        rng = np.random.default_rng(self.seed)
        n = self.num_requests
        rows = read_trace(self.trace) if self.trace is not None else None
        if self.arrival == "trace":
            times = np.resize(rows[:, 0], n)
            if n > len(rows):  # repeat the trace end to end
                span = rows[-1, 0] - rows[0, 0]
                times = times + (np.arange(n) // len(rows)) * (span + (span / max(1, len(rows) - 1)))
            times = times - times[0]
        elif math.isinf(self.request_rate):
            times = np.zeros(n)
        else:
            shape = 1.0 if self.arrival == "poisson" else self.burstiness
            gaps = rng.gamma(shape, 1.0 / (self.request_rate * shape), size=n)
            gaps[0] = 0.0
            times = np.cumsum(gaps)
        if not np.isfinite(times).all():  # a rate so low, or a trace repeated so often, that the times overflow
            what = f"trace={self.trace!r}" if self.arrival == "trace" else f"request_rate={self.request_rate!r}"
            raise ValueError(f"{what}: the arrival times of {n} requests overflow (they must stay finite)")
        ins = self.input_len.sample(rng, n, None if rows is None else rows[:, 1])
        outs = self.output_len.sample(rng, n, None if rows is None else rows[:, 2])
        pooling = None
        if self.embed_fraction > 0:  # its own stream: the arrivals and lengths do not change with the mix
            pooling = np.random.default_rng([self.seed, 1]).random(n) < self.embed_fraction
        return Arrivals(times, ins, outs, pooling)

    def describe(self) -> dict:
        return {"num_requests": self.num_requests, "request_rate": None if math.isinf(self.request_rate) else self.request_rate, "arrival": self.arrival,
                "burstiness": self.burstiness, "input_len": str(self.input_len), "output_len": str(self.output_len),
                "seed": self.seed, "trace": self.trace, "embed_fraction": self.embed_fraction}

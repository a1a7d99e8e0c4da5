"""Device strings: Furiosa's grammar (``npu:X``, ``npu:X:Y``, ``npu:X:A-B``) plus ``cpu`` and ``cuda:N``.

Parsing gives value objects; a bad string is a ``ValueError`` naming the token and the rule it broke.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PES_PER_CARD = 8
FUSED_SPANS = (1, 2, 4, 8)

_NPU = re.compile(r"^npu:(\d+)(?::(\d+)(?:-(\d+))?)?$")
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


@dataclass(frozen=True, slots=True)
class CoreRange:
    """PEs ``start``..``end`` (inclusive) of one card; an aligned span of 1, 2, 4 or 8."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.end < PES_PER_CARD):
            raise ValueError(
                f"core range {self.start}-{self.end}: PE indices must satisfy 0 <= start <= end <= {PES_PER_CARD - 1}"
            )
        span = self.end - self.start + 1
        if span not in FUSED_SPANS:
            raise ValueError(f"core range {self.start}-{self.end}: span {span} is not one of {FUSED_SPANS}")
        if self.start % span:
            raise ValueError(
                f"core range {self.start}-{self.end}: a span of {span} must start at a multiple of {span}"
            )

    @property
    def num_pes(self) -> int:
        return self.end - self.start + 1

    def __str__(self) -> str:
        return str(self.start) if self.start == self.end else f"{self.start}-{self.end}"


@dataclass(frozen=True, slots=True)
class Device:
    """One device: ``kind`` is ``npu``, ``cpu`` or ``cuda``. An NPU with ``cores=None`` is the whole card."""

    kind: str
    index: int = 0
    cores: CoreRange | None = None

    @property
    def num_pes(self) -> int:
        if self.kind != "npu":
            return 1
        return self.cores.num_pes if self.cores is not None else PES_PER_CARD

    @property
    def torch_device(self) -> str:
        if self.kind == "npu":
            raise ValueError(f"device {self}: an NPU is not a torch device")
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def __str__(self) -> str:
        if self.kind == "cpu":
            return "cpu"
        if self.kind == "cuda":
            return f"cuda:{self.index}"
        return f"npu:{self.index}" if self.cores is None else f"npu:{self.index}:{self.cores}"


def parse_device(token: str) -> Device:
    """Parse one device token, e.g. ``npu:0``, ``npu:1:4-7``, ``cpu``, ``cuda:0``."""
    if not isinstance(token, str):
        raise ValueError(f"device {token!r}: expected a string")
    tok = token.strip()
    if tok == "cpu":
        return Device("cpu")
    if m := _CUDA.match(tok):
        return Device("cuda", int(m.group(1) or 0))
    if m := _NPU.match(tok):
        card = int(m.group(1))
        if m.group(2) is None:
            return Device("npu", card)
        start = int(m.group(2))
        end = int(m.group(3)) if m.group(3) is not None else start
        if start >= PES_PER_CARD or end >= PES_PER_CARD:
            raise ValueError(
                f"device {tok!r}: PE index must be 0-{PES_PER_CARD - 1} (a card has {PES_PER_CARD} PEs)"
            )
        if end < start:
            raise ValueError(f"device {tok!r}: range end {end} is below its start {start}")
        try:
            return Device("npu", card, CoreRange(start, end))
        except ValueError as e:
            raise ValueError(f"device {tok!r}: {e}") from None
    raise ValueError(
        f"device {tok!r}: expected 'npu:X', 'npu:X:Y', 'npu:X:A-B' (aligned span of 1, 2, 4 or 8 PEs), "
        "'cpu' or 'cuda:N'"
    )


def parse_devices(spec: str | list[str] | tuple[str, ...]) -> list[Device]:
    """Parse a comma-separated device list. Duplicates and overlapping PE ranges are errors."""
    if isinstance(spec, str):
        tokens = spec.split(",")
    elif isinstance(spec, (list, tuple)) and all(isinstance(t, str) for t in spec):
        tokens = list(spec)
    else:
        raise ValueError(f"devices={spec!r}: must be a string such as 'npu:0,npu:1' (or a list of such strings)")
    tokens = [t for t in (t.strip() for t in tokens) if t]
    if not tokens:
        raise ValueError(f"devices {spec!r}: expected at least one device")
    devices = [parse_device(t) for t in tokens]
    seen: dict[tuple[str, int], list[Device]] = {}
    for d in devices:
        for other in seen.get((d.kind, d.index), []):
            if _overlaps(d, other):
                raise ValueError(f"devices {spec!r}: {d} overlaps {other}")
        seen.setdefault((d.kind, d.index), []).append(d)
    kinds = {d.kind for d in devices}
    if len(kinds) > 1:
        raise ValueError(f"devices {spec!r}: cannot mix device kinds {sorted(kinds)}")
    return devices


def _overlaps(a: Device, b: Device) -> bool:
    if a.kind != "npu" or a.cores is None or b.cores is None:
        return True
    return not (a.cores.end < b.cores.start or b.cores.end < a.cores.start)


def format_devices(devices: list[Device]) -> str:
    return ",".join(str(d) for d in devices)

"""Finding devices: RNGD NPUs through ``furiosa_smi`` when installed, else the CPU; CUDA through torch.

``furiosa_smi`` (2026.4) lists cards with ``list_devices()``; each has ``device_name()`` ("npuN": the
card's own index N, which is what ``npu:N`` means, also when a host sees only some cards),
``core_num()`` (its PEs), ``core_status()`` (PE -> ``CoreStatus.Available`` | ``CoreStatus.Occupied``)
and ``memory_usage()`` (``total_bytes``, ``in_use_bytes``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from .devices import CoreRange, Device

logger = logging.getLogger("furiosa_llm.hal")

_NAME = re.compile(r"^npu(\d+)$")


@dataclass(slots=True)
class NpuCard:
    """One RNGD card as ``furiosa_smi`` sees it. Memory in bytes (None when it could not be read)."""

    index: int
    num_pes: int
    available: list[int] = field(default_factory=list)
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None


def _smi():
    try:
        import furiosa_smi  # type: ignore[import-not-found]
    except ImportError:
        return None
    return furiosa_smi


def card_index(name: str) -> int:
    """``"npu3"`` -> 3; ``ValueError`` for a name of another form."""
    m = _NAME.match(str(name).strip())
    if m is None:
        raise ValueError(f"device_name {name!r}: expected 'npuN'")
    return int(m.group(1))


def list_npu_cards(smi=None) -> list[NpuCard]:
    """Every RNGD card ``furiosa_smi`` lists, by its own index; [] without ``furiosa_smi`` or a card.

    A listing that fails (a driver problem) is logged and gives [], so CPU serving still starts.
    """
    smi = smi or _smi()
    if smi is None:
        return []
    try:
        cards = []
        for dev in smi.list_devices():
            card = NpuCard(card_index(dev.device_name()), int(dev.core_num()))
            status = dev.core_status()
            items = status.items() if hasattr(status, "items") else enumerate(status)
            for core, state in items:
                core = int(getattr(core, "core", core))
                if state == smi.CoreStatus.Available and 0 <= core < card.num_pes:
                    card.available.append(core)
            card.available.sort()
            try:
                mem = dev.memory_usage()
                card.memory_total_bytes, card.memory_used_bytes = int(mem.total_bytes), int(mem.in_use_bytes)
            except Exception as e:  # noqa: BLE001 - memory is a report, not a requirement
                logger.debug("memory_usage() of %s failed: %s", dev.device_name(), e)
            cards.append(card)
        return sorted(cards, key=lambda c: c.index)
    except Exception as e:  # noqa: BLE001 - a driver problem must not take down CPU serving
        logger.warning("furiosa_smi is installed but listing devices failed: %s", e)
        return []


def available_npu_pes(smi=None) -> list[Device]:
    """Available RNGD PEs as single-PE devices, or [] when ``furiosa_smi`` is missing or finds none."""
    return [Device("npu", c.index, CoreRange(pe, pe)) for c in list_npu_cards(smi) for pe in c.available]


def compact_pes(card: int, pes: list[int], num_pes: int) -> list[Device]:
    """Free PEs of one card as the fewest aligned spans (``npu:X`` for a whole free card)."""
    free = set(pes)
    if len(free) == num_pes:
        return [Device("npu", card)]
    out = []
    pe = 0
    while pe < num_pes:
        for span in (8, 4, 2, 1):
            if span <= num_pes and pe % span == 0 and all(p in free for p in range(pe, pe + span)):
                out.append(Device("npu", card, CoreRange(pe, pe + span - 1)))
                pe += span
                break
        else:
            pe += 1
    return out


def available_npu_devices(smi=None) -> list[Device]:
    """The available PEs of every card, compacted (what ``--devices`` omitted means on RNGD)."""
    return [d for c in list_npu_cards(smi) for d in compact_pes(c.index, c.available, c.num_pes)]


def available_cuda() -> list[Device]:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return []
    if not torch.cuda.is_available():
        return []
    return [Device("cuda", i) for i in range(torch.cuda.device_count())]


def describe_available(smi=None) -> str:
    names = ["cpu"] + [str(d) for d in available_cuda()] + [str(d) for d in available_npu_devices(smi)]
    return ", ".join(names)


def default_devices(smi=None) -> list[Device]:
    """With no ``--devices``: the available RNGD PEs found through ``furiosa_smi``, else ``cpu``."""
    npus = available_npu_devices(smi)
    if npus:
        logger.info("no --devices given; using the available RNGD PEs found by furiosa_smi: %s", ",".join(map(str, npus)))
        return npus
    logger.info("no --devices given and no RNGD NPU found (furiosa_smi); using cpu")
    return [Device("cpu")]


def check_available(devices: list[Device], smi=None) -> None:
    """Raise a ``ValueError`` listing what is free when a requested device is absent or occupied."""
    cards = None
    for d in devices:
        if d.kind == "npu":
            cards = {c.index: c for c in list_npu_cards(smi)} if cards is None else cards
            free = ", ".join(str(x) for c in cards.values() for x in compact_pes(c.index, c.available, c.num_pes)) or "none"
            card = cards.get(d.index)
            if card is None:
                found = ", ".join(f"npu{i}" for i in cards) or "no RNGD card (is furiosa-smi installed and the driver loaded?)"
                raise ValueError(f"devices: {d} is not available (card npu{d.index} not found; found: {found}); "
                                 f"free PEs: {free}; available: {describe_available(smi)}")
            want = range(d.cores.start, d.cores.end + 1) if d.cores else range(card.num_pes)
            if d.cores is not None and d.cores.end >= card.num_pes:
                raise ValueError(f"devices: {d}: card npu{d.index} has {card.num_pes} PEs; free PEs: {free}")
            busy = [pe for pe in want if pe not in card.available]
            if busy:
                raise ValueError(f"devices: {d}: PE {', '.join(map(str, busy))} of npu{d.index} occupied; free PEs: {free}")
        elif d.kind == "cuda":
            if d not in available_cuda():
                raise ValueError(f"devices: {d} is not available; available: {describe_available(smi)}")

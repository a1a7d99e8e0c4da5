"""Finding devices: RNGD NPUs through ``furiosa_smi`` when installed, else the CPU; CUDA through torch."""

from __future__ import annotations

import logging

from .devices import PES_PER_CARD, CoreRange, Device

logger = logging.getLogger("furiosa_llm.hal")


def available_npu_pes() -> list[Device]:
    """Available RNGD PEs as single-PE devices, or [] when ``furiosa_smi`` is missing or finds none."""
    try:
        import furiosa_smi  # type: ignore[import-not-found]
    except ImportError:
        return []
    try:
        found: list[Device] = []
        for idx, dev in enumerate(furiosa_smi.list_devices()):
            status = dev.core_status()
            items = status.items() if hasattr(status, "items") else enumerate(status)
            for core, state in items:
                core = int(getattr(core, "core", core))
                if "available" in str(state).lower() and 0 <= core < PES_PER_CARD:
                    found.append(Device("npu", idx, CoreRange(core, core)))
        return found
    except Exception as e:  # a driver problem must not take down CPU serving
        logger.warning("furiosa_smi is installed but listing devices failed: %s", e)
        return []


def available_cuda() -> list[Device]:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return []
    if not torch.cuda.is_available():
        return []
    return [Device("cuda", i) for i in range(torch.cuda.device_count())]


def describe_available() -> str:
    npus = available_npu_pes()
    names = ["cpu"] + [str(d) for d in available_cuda()] + [str(d) for d in npus]
    return ", ".join(names)


def default_devices() -> list[Device]:
    """With no ``--devices``: RNGD PEs found through ``furiosa_smi``, else ``cpu``."""
    npus = available_npu_pes()
    if npus:
        logger.info("no --devices given; using %d available RNGD PEs found by furiosa_smi", len(npus))
        return npus
    logger.info("no --devices given and no RNGD NPU found (furiosa_smi); using cpu")
    return [Device("cpu")]


def check_available(devices: list[Device]) -> None:
    """Raise a ``ValueError`` listing what is available when a requested device does not exist."""
    for d in devices:
        if d.kind == "npu":
            have = {(p.index, p.cores.start) for p in available_npu_pes() if p.cores is not None}
            cores = range(d.cores.start, d.cores.end + 1) if d.cores else range(PES_PER_CARD)
            missing = [c for c in cores if (d.index, c) not in have]
            if missing:
                raise ValueError(
                    f"devices: {d} is not available (no RNGD PE {d.index}:{missing[0]} found via furiosa_smi); "
                    f"available: {describe_available()}"
                )
        elif d.kind == "cuda":
            if d not in available_cuda():
                raise ValueError(f"devices: {d} is not available; available: {describe_available()}")

"""Connecting to Ray, the optional extra ``[ray]``: imported only when a caller asks for it.

Used by the simulator's sweeps and replica groups (``furiosa_llm.sim.distributed``) and by the
data-parallel engine front (``furiosa_llm.api.data_parallel``). ``ray_address`` names the cluster:

- ``"local"``: start a Ray on this machine (no dashboard) for this process;
- None: ``RAY_ADDRESS`` when it is set, else ``"local"``;
- ``"auto"``: join the cluster this machine belongs to (``ray start --head`` ran here);
- anything else: a cluster address, e.g. ``"10.0.0.5:6379"`` or ``"ray://head:10001"``.

An already connected driver (``ray.init`` called by the user, or a test) is used as it is.
Every node of a cluster needs this package installed (``pip install .[ray]``) in the same Python.
"""

from __future__ import annotations

import os


def import_ray():
    """The ``ray`` module; an ``ImportError`` naming the extra when it is not installed."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("Ray is not installed: pip install 'furiosa-llm-sim[ray]' (or: pip install ray)") from e
    return ray


def connect(ray_address: str | None = "local", *, num_cpus: int | None = None):
    """Connect this process to Ray (see the module docstring for ``ray_address``); returns the ``ray`` module.

    ``num_cpus`` caps a local Ray (default: this machine's CPUs). ``ValueError`` for an empty address.
    """
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise ValueError(f"ray={ray_address!r}: must be 'local', 'auto' or a Ray cluster address such as 'HOST:6379'")
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if ray_address is None:
        ray_address = os.environ.get("RAY_ADDRESS") or "local"
    if ray_address == "local":
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    else:
        address = ray_address.strip()
        _check_reachable(address)
        ray.init(address=address, log_to_driver=False)
    return ray


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """``ValueError`` within ``timeout_s`` when nothing answers at a ``HOST:PORT`` address (Ray itself retries
    for minutes); ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"ray={address!r}: must be 'local', 'auto', 'HOST:PORT' or 'ray://HOST:PORT'")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"ray={address!r}: no Ray head answers at {host}:{port} ({e}); start one there with "
                         f"`ray start --head --port {port}` or pass --ray local") from None

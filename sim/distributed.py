"""Ray for the simulator: independent pieces of work (sweep points, replica groups) as Ray tasks.

Ray is imported here only, and only when a caller asks for it (``ray=`` not None, or
``simulate(workers > 1)``); it is the optional extra ``[ray]``. ``ray`` names the cluster:

- ``"local"``: start a Ray on this machine (no dashboard) for this process;
- ``"auto"``: join the cluster this machine belongs to (``ray start --head`` ran here or ``RAY_ADDRESS`` is set);
- anything else: a cluster address, e.g. ``"10.0.0.5:6379"`` or ``"ray://head:10001"``.

An already connected driver (``ray.init`` called by the user, or a test) is used as it is.
Every node of a cluster needs this package installed (``pip install .[ray]``) in the same Python.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence


def import_ray():
    """The ``ray`` module; a clear ``ImportError`` naming the extra when it is not installed."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("Ray is not installed: pip install 'furiosa-llm-sim[ray]' (or: pip install ray)") from e
    return ray


def connect(ray_address: str | None = "local", *, num_cpus: int | None = None):
    """Connect this process to Ray (see the module docstring for ``ray_address``); returns the ``ray`` module.

    ``num_cpus`` caps a ``"local"`` Ray (default: this machine's CPUs). ``ValueError`` for an empty address.
    """
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise ValueError(f"ray={ray_address!r}: must be 'local', 'auto' or a Ray cluster address such as 'HOST:6379'")
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if ray_address in (None, "local"):
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=ray_address.strip(), log_to_driver=False)
    return ray


def _call(fn: Callable, args: tuple) -> Any:
    return fn(*args)


def run_tasks(fn: Callable, args: Sequence[tuple], *, ray_address: str | None = "local", progress: bool = False,
              desc: str = "tasks", unit: str = "task") -> Iterator[tuple[int, Any, BaseException | None]]:
    """Run ``fn(*a)`` for each ``a`` in ``args`` as Ray tasks; yield ``(i, result, error)`` as each finishes.

    Results come in the order they finish (stream them into a report by ``i``); a task that raised,
    or whose worker died, yields its exception as ``error`` (the task's own exception where Ray
    kept it) and the others go on. ``progress`` shows a bar that counts finished tasks.
    """
    ray = connect(ray_address)
    remote = ray.remote(num_cpus=1, max_retries=0)(_call)
    fn_ref = ray.put(fn)
    pending = {remote.remote(fn_ref, tuple(a)): i for i, a in enumerate(args)}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), unit=unit, desc=desc)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            i = pending.pop(ref)
            try:
                result, error = ray.get(ref), None
            except ray.exceptions.RayTaskError as e:  # the task raised: hand back its own exception
                cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
                result, error = None, getattr(e, "cause", None) or cause
            except ray.exceptions.RayError as e:  # the worker died, the node went away, ...
                result, error = None, e
            if bar is not None:
                bar.update(1)
            yield i, result, error
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if bar is not None:
            bar.close()

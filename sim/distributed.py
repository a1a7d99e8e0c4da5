"""Ray for the simulator: independent pieces of work (sweep points, replica groups) as Ray tasks.

Ray is imported only when a caller asks for it (``ray=`` not None, or ``simulate(workers > 1)``);
``ray_address`` is as in ``furiosa_llm.api.distributed.connect`` (``local``, ``auto`` or an address).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from furiosa_llm.api.distributed import connect, import_ray  # noqa: F401 - one place for Ray's connection


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

"""The simulator on Ray: sweep points and replica groups as Ray tasks give the serial reports.

One local Ray (2 CPUs) for the module; Ray's start costs ~20 s here, so the module is small.
Skipped when Ray (the extra ``[ray]``) is not installed.
"""

from __future__ import annotations

import json
import os
import time

import pytest

ray = pytest.importorskip("ray")

from furiosa_llm.sim import SLO, SimConfig, Workload, simulate, sweep  # noqa: E402
from furiosa_llm.sim.distributed import run_tasks  # noqa: E402
from furiosa_llm.sim.report import jsonable  # noqa: E402

SMALL = dict(num_requests=30, input_len="lognormal:512:0.5", output_len="lognormal:64:0.5")


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _dump(obj) -> str:
    return json.dumps(jsonable(obj), indent=2)


def test_sweep_of_8_points_on_ray_equals_the_serial_sweep(local_ray):
    w = Workload(seed=4, **SMALL)
    slo = SLO(ttft_ms=1000, tpot_ms=60)
    grid = {"devices": ["npu:0", "npu:0,npu:1"], "tensor_parallel_size": [8, 16], "npu_queue_limit": [1, 2]}
    t0 = time.perf_counter()
    serial = sweep(SimConfig(), w, slo, grid, rel_tol=0.3, max_probes=6)
    t1 = time.perf_counter()
    seen = []
    on_ray = sweep(SimConfig(), w, slo, grid, rel_tol=0.3, max_probes=6, ray="local", on_row=lambda i, r: seen.append(i))
    t2 = time.perf_counter()
    print(f"8-point sweep: serial {t1 - t0:.2f} s, Ray (2 CPUs) {t2 - t1:.2f} s")
    assert len(serial) == 8 and sorted(seen) == list(range(8))
    assert _dump(on_ray) == _dump(serial)  # byte for byte, failed points included
    errors = [r for r in on_ray if "error" in r]
    assert errors and all(r["point"] == {"devices": "npu:0", "tensor_parallel_size": 16, "npu_queue_limit": q}
                          for r, q in zip(errors, (1, 2)))  # a card has 8 PEs; the other 6 points completed
    assert all(r["max_request_rate"] > 0 for r in on_ray if "error" not in r)


def test_a_failed_task_is_reported_and_the_others_complete(local_ray):
    def _maybe_fail(x: int) -> int:  # local, so Ray ships it by value (workers cannot import a test module)
        if x == 2:
            raise RuntimeError("point 2 is broken")
        if x == 3:
            os._exit(1)  # the worker process dies
        return x * 10

    got = {i: (r, e) for i, r, e in run_tasks(_maybe_fail, [(x,) for x in range(5)])}
    assert {i: r for i, (r, e) in got.items() if e is None} == {0: 0, 1: 10, 4: 40}
    assert isinstance(got[2][1], RuntimeError) and "point 2 is broken" in str(got[2][1])
    assert isinstance(got[3][1], ray.exceptions.RayError)


def test_simulate_workers_as_ray_tasks_equal_one_process(local_ray):
    cfg = SimConfig(devices="npu:0,npu:1")
    w = Workload(request_rate=8.0, seed=7, **SMALL)
    one = simulate(cfg, w, dispatch="round_robin").report
    two = simulate(cfg, w, dispatch="round_robin", workers=2).report
    assert _dump(one) == _dump(two)


def test_max_rate_probing_ahead_on_ray_equals_the_serial_search(local_ray):
    from furiosa_llm.sim import max_rate

    w = Workload(seed=4, **SMALL)
    slo = SLO(ttft_ms=1000, tpot_ms=60)
    serial = max_rate(SimConfig(devices="npu:0"), w, slo, rel_tol=0.1)
    on_ray = max_rate(SimConfig(devices="npu:0"), w, slo, rel_tol=0.1, ray="local")
    assert _dump(on_ray) == _dump(serial) and len(serial["probes"]) >= 4


def test_cli_plan_with_ray_writes_the_serial_plan(local_ray, tmp_path):
    from furiosa_llm.entrypoints.cli import main

    args = ["plan", "--model", "llama-3.1-8b", "--num-requests", "40", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "50",
            "--rel-tol", "1.0", "--start-rate", "8", "--sweep", "max-processing-samples=16,256", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "serial.json")]) == 0
    assert main(args + ["--ray", "local", "--out", str(tmp_path / "ray.json"), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "ray.json").read_bytes() == (tmp_path / "serial.json").read_bytes()
    assert (tmp_path / "p.png").stat().st_size > 10_000

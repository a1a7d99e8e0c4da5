"""The routing policies shared by the simulator's dispatch and the data-parallel front (no Ray)."""

from __future__ import annotations

import pytest

from furiosa_llm.core.routing import LeastOutstandingTokens, make_router
from furiosa_llm.sim import SimConfig, Workload, simulate


def test_least_tokens_counts_work_not_requests():
    r = LeastOutstandingTokens(2)
    r.add(0, "long", prompt_tokens=1000, max_tokens=500)
    assert r.choose(10) == 1
    r.add(1, "a", 10, 10)
    r.add(1, "b", 10, 10)
    assert r.choose(10) == 1  # two small requests are less work than one long one
    assert make_router("least_loaded", 2).choose() == 0
    r.progress("long", 1)  # the prompt is computed and one token came out
    assert r.tokens == [499, 40]
    r.progress("long", 600)
    assert r.tokens[0] == 0 and r.requests[0] == 1
    assert r.finish("long") == 0 and r.requests == [0, 2] and r.tokens == [0, 40]
    assert r.finish("unknown") is None
    assert r.choose(available=[1]) == 1
    with pytest.raises(RuntimeError, match="no replica"):
        r.choose(available=[])


def test_round_robin_skips_unavailable_and_bad_names_are_errors():
    rr = make_router("round_robin", 3)
    assert [rr.choose() for _ in range(4)] == [0, 1, 2, 0]
    assert rr.choose(index=1, available=[0, 2]) == 2
    with pytest.raises(ValueError, match="routing policy 'random'"):
        make_router("random", 2)
    with pytest.raises(ValueError, match="num_replicas=0"):
        make_router("least_tokens", 0)


def test_simulator_dispatches_with_the_same_policies():
    cfg = SimConfig(devices="npu:0,npu:1")
    w = Workload(request_rate=20.0, seed=5, num_requests=120, input_len="lognormal:512:1.0", output_len="lognormal:64:1.0")
    by = {d: simulate(cfg, w, dispatch=d).report for d in ("least_loaded", "least_tokens", "round_robin")}
    for d, rep in by.items():
        assert rep["dispatch"] == d and rep["metrics"]["completed"] == 120
    assert by["least_tokens"]["metrics"] != by["round_robin"]["metrics"]
    with pytest.raises(ValueError, match="dispatch='random'"):
        simulate(cfg, w, dispatch="random")


def test_data_parallel_device_split():
    from furiosa_llm import EngineArgs
    from furiosa_llm.api.data_parallel import replica_devices

    assert replica_devices(EngineArgs(model="m", devices="cpu", data_parallel_size=3)) == ["cpu"] * 3
    assert replica_devices(EngineArgs(model="m", devices="cuda:0,cuda:1", data_parallel_size=2)) == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match=r"devices='cuda:0' with data_parallel_size=2"):
        replica_devices(EngineArgs(model="m", devices="cuda:0", data_parallel_size=2))


def test_ray_is_not_imported_without_a_ray_flag():
    import subprocess
    import sys

    code = ("import sys; from furiosa_llm.sim import SimConfig, Workload, simulate, sweep, SLO; "
            "from furiosa_llm.entrypoints.cli import build_parser; build_parser(); "
            "simulate(SimConfig(), Workload(num_requests=5, input_len='fixed:16', output_len='fixed:4')); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_an_unreachable_ray_address_is_a_fast_clear_error():
    import time

    from furiosa_llm.api.distributed import _check_reachable

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"ray='127.0.0.1:1': no Ray head answers"):
        _check_reachable("127.0.0.1:1")
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match="HOST:PORT"):
        _check_reachable("just-a-host")
    _check_reachable("auto")  # left to Ray

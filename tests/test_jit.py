"""JIT compilation of decode buckets: the policy (no torch), the simulator's costs, the torch backend."""

from __future__ import annotations

import logging
import time

import pytest

from furiosa_llm.core import BucketState, EngineCore, JitConfig, JitPolicy, Request, Scheduler, SchedulerConfig
from furiosa_llm.hal import Batch, Bucket, SamplingSettings, SequenceChunk, ThreadedQueue

from conftest import CACHE_DIR, MODEL
from fakes import FakeQueue


def _batch(*contexts: int, prefill: bool = False) -> Batch:
    seqs = [SequenceChunk(f"r{i}", [1, 2] if prefill and i == 0 else [1], c - (2 if prefill and i == 0 else 1), [0],
                          True, SamplingSettings()) for i, c in enumerate(contexts)]
    return Batch(0, seqs)


# ---- policy ---------------------------------------------------------------------------------------
def test_buckets_round_batch_and_length_up_to_edges():
    p = JitPolicy(JitConfig(True), num_layers=30)
    assert p.bucket_of(_batch(10)) == Bucket(1, 64)
    assert p.bucket_of(_batch(10, 70, 3)) == Bucket(4, 128)
    assert p.bucket_of(_batch(64, 64)) == Bucket(2, 64)
    assert p.bucket_of(_batch(10, 20, prefill=True)) is None  # prefill and mixed steps are not bucketed
    assert p.bucket_of(_batch(10**6)) is None  # beyond the largest edge
    assert p.num_units == 4  # ceil(30 / 8)


def test_threshold_workers_ready_and_failed():
    p = JitPolicy(JitConfig(True, threshold=3, max_workers=2, unit_size=4), num_layers=8)
    shapes = [_batch(10), _batch(10, 10), _batch(10, 10, 10)]  # buckets b1, b2, b4
    for _ in range(2):
        for b in shapes:
            assert p.observe(b) is None
    assert p.start() == [] and p.stats.steps_slow == 6
    for b in shapes:
        p.observe(b)
    assert [p.state(p.bucket_of(b)) for b in shapes] == [BucketState.QUEUED] * 3
    started = p.start()
    assert len(started) == 2 and p.compiling == 2  # at most max_workers at once
    assert p.start() == []
    p.end_compilation(started[0], True, 1.5, now=10.0)
    assert p.state(started[0]) is BucketState.READY and p.stats.first_ready_at == 10.0
    third = p.start()
    assert len(third) == 1 and p.compiling == 2
    p.end_compilation(started[1], False, 0.5, now=11.0, error="boom")
    assert p.state(started[1]) is BucketState.FAILED
    ready_batch = next(b for b in shapes if p.bucket_of(b) == started[0])
    failed_batch = next(b for b in shapes if p.bucket_of(b) == started[1])
    assert p.observe(ready_batch) == started[0]  # runs compiled
    for _ in range(10):
        assert p.observe(failed_batch) is None  # stays on the slow path, never requeued
    assert p.start() == [] and p.stats.compilations_started == 3
    assert p.stats.compilations_finished == 1 and p.stats.compilations_failed == 1
    assert p.stats.compile_seconds_total == 2.0 and 0 < p.stats.hit_rate < 1
    with pytest.raises(RuntimeError, match="was not compiling"):
        p.end_compilation(started[0], True, 1.0, now=12.0)


@pytest.mark.parametrize("kw,needle", [({"threshold": 0}, "jit_threshold=0"), ({"max_workers": 0}, "jit_max_workers=0"),
                                        ({"unit_size": 1}, "jit_unit_size=1")])
def test_jit_config_rejects_bad_values(kw, needle):
    with pytest.raises(ValueError, match=needle):
        JitConfig(True, **kw)


def test_engine_args_defaults_are_the_seeds():
    from furiosa_llm import EngineArgs

    a = EngineArgs(model=MODEL)
    assert (a.enable_jit_compilation, a.jit_threshold, a.jit_max_workers, a.jit_unit_size) == (False, 5, 15, 8)
    for kw, needle in (({"jit_threshold": 0}, "jit_threshold"), ({"jit_max_workers": 0}, "jit_max_workers"),
                       ({"jit_unit_size": 1}, "jit_unit_size"), ({"enable_jit_compilation": "yes"}, "enable_jit")):
        with pytest.raises(ValueError, match=needle):
            EngineArgs(model=MODEL, **kw)


def test_backend_without_compiler_disables_buckets_and_serving_goes_on(caplog):
    class Echo:
        def execute(self, batch):
            from furiosa_llm.hal import StepResult

            return StepResult(batch.step_id, {s.request_id: 5 for s in batch.sequences if s.sample})

    queue = ThreadedQueue(Echo(), 1)
    jit = JitPolicy(JitConfig(True, threshold=1), num_layers=4)
    core = EngineCore(Scheduler(SchedulerConfig(num_blocks=16, block_size=4)), queue, time.monotonic, jit=jit)
    core.add_request(Request("a", [1, 2, 3], max_tokens=6, arrival_time=0.0))
    with caplog.at_level(logging.WARNING, logger="furiosa_llm"):
        outs = []
        while core.has_unfinished():
            outs += core.step()
    queue.close()
    assert sum(len(o.new_token_ids) for o in outs) == 6
    assert jit.stats.compilations_failed >= 1 and jit.stats.steps_compiled == 0
    assert "has no JIT compiler" in caplog.text


# ---- simulator --------------------------------------------------------------------------------------
def test_simulated_jit_warms_up_then_matches_aot():
    from furiosa_llm.sim import SimConfig, Workload, simulate

    w = Workload(num_requests=300, request_rate=6.0, input_len="lognormal:512:0.5", output_len="lognormal:128:0.5", seed=3)
    off = simulate(SimConfig(), w).report["metrics"]
    on = simulate(SimConfig(enable_jit_compilation=True, jit_compile_s_per_unit=2.0, jit_slow_factor=2.0), w).report
    m = on["metrics"]
    jit = m["jit"]
    assert jit["compilations_started"] >= jit["compilations_finished"] >= 1 and jit["compilations_failed"] == 0
    assert 0.5 < jit["hit_rate"] < 1.0  # slow until the buckets are ready, then compiled
    assert jit["first_bucket_ready_s"] >= 4 * 2.0  # 32 layers / 8 per unit x 2 s
    assert m["mean_tpot_ms"] > off["mean_tpot_ms"]
    # compiles that finish instantly cost nothing
    free = simulate(SimConfig(enable_jit_compilation=True, jit_compile_s_per_unit=0.0, jit_threshold=1), w).report["metrics"]
    assert free["mean_tpot_ms"] == pytest.approx(off["mean_tpot_ms"], rel=0.02)


# ---- torch backend ----------------------------------------------------------------------------------
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three prime numbers:", "Once upon a time"]


def _engine(jit: bool, monkeypatch, backend: str = "aot_eager"):
    from furiosa_llm import EngineArgs, LLMEngine

    monkeypatch.setenv("FURIOSA_LLM_JIT_BACKEND", backend)
    return LLMEngine(EngineArgs(model=MODEL, cache_dir=CACHE_DIR, devices="cpu", num_kv_blocks=256, dtype="float32",
                                enable_jit_compilation=jit, jit_threshold=2, jit_max_workers=2))


def _generate(engine, tag: str, n_tokens: int = 24) -> list[list[int]]:
    from furiosa_llm import SamplingParams

    for i, p in enumerate(PROMPTS):
        engine.add_request(f"{tag}{i}", p, SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True))
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    return [outs[f"{tag}{i}"] for i in range(len(PROMPTS))]


def _warm(engine, timeout: float = 600.0) -> None:
    """Serve until the 4-row bucket is compiled; serving goes on eagerly meanwhile."""
    jit = engine.core.jit
    _generate(engine, "warm", 8)
    deadline = time.monotonic() + timeout
    while jit.compiling and time.monotonic() < deadline:
        time.sleep(0.2)
        engine.core.poll_compilations()
    assert jit.stats.steps_slow > 0  # requests were served before any bucket was ready
    assert any(s is BucketState.READY for s in (e.state for e in jit.buckets.values())), jit.stats.as_dict()


def _parity(monkeypatch, backend: str):
    off = _engine(False, monkeypatch, backend)
    expected = _generate(off, "a")
    off.shutdown()
    on = _engine(True, monkeypatch, backend)
    try:
        _warm(on)
        before = on.core.jit.stats.steps_compiled
        got = _generate(on, "b")
        assert on.core.jit.stats.steps_compiled - before >= 10  # most decode steps ran compiled
        assert got == expected
    finally:
        on.shutdown()


def test_greedy_parity_jit_on_and_off(monkeypatch):
    """Graph capture through torch.compile (aot_eager backend keeps CI fast); the same tokens."""
    _parity(monkeypatch, "aot_eager")


@pytest.mark.slow
def test_greedy_parity_jit_on_and_off_inductor(monkeypatch):
    """The default backend, with code generation; compiling takes minutes on a 2-core CPU."""
    _parity(monkeypatch, "inductor")


def test_failed_compilation_keeps_serving(monkeypatch, caplog):
    off = _engine(False, monkeypatch)
    expected = _generate(off, "a")
    off.shutdown()
    on = _engine(True, monkeypatch)

    def broken(bucket, num_units):
        raise RuntimeError("planted compiler failure")

    monkeypatch.setattr(on.runner, "compile_bucket", broken)
    try:
        with caplog.at_level(logging.WARNING, logger="furiosa_llm"):
            got = _generate(on, "b")
            got2 = _generate(on, "c")
        assert got == expected == got2
        stats = on.core.jit.stats
        assert stats.compilations_failed >= 1 and stats.steps_compiled == 0
        assert "planted compiler failure" in caplog.text
    finally:
        on.shutdown()

"""Scheduler, allocator and EngineCore against a fake device at the HAL seam."""

import pytest

from furiosa_llm.core import BlockAllocator, BlockTable, EngineCore, Request, RequestStatus, Scheduler, SchedulerConfig
from furiosa_llm.hal import SamplingSettings

from fakes import FakeQueue, fake_token


def make_core(limit=1, record=True, eos=None, eos_after=None, **cfg):
    cfg.setdefault("num_blocks", 64)
    cfg.setdefault("block_size", 4)
    sched = Scheduler(SchedulerConfig(**cfg), eos_token_ids=frozenset({eos} if eos is not None else ()), record_trace=record)
    q = FakeQueue(limit, eos=eos, eos_after=eos_after)
    return EngineCore(sched, q, clock=lambda: q.now), q


def req(rid, n_prompt, max_tokens=4, base=0, **kw):
    return Request(rid, list(range(base + 1, base + n_prompt + 1)), max_tokens=max_tokens, arrival_time=0.0, **kw)


def drain(core, limit=10_000):
    outs = []
    for _ in range(limit):
        if not core.has_unfinished():
            return outs
        outs += core.step()
    raise AssertionError("did not drain")


def test_generates_tokens_and_frees_blocks():
    core, _ = make_core()
    core.add_request(req("a", 10, max_tokens=5))
    outs = drain(core)
    toks = [t for o in outs if o.request_id == "a" for t in o.new_token_ids]
    assert toks == [fake_token("a", 10 + i) for i in range(5)]
    assert outs[-1].finish_reason == "length"
    assert core.scheduler.allocator.num_free == core.scheduler.allocator.num_blocks


def test_a_step_error_for_one_request_ends_it_alone():
    """A backend's ``StepResult.errors`` entry (e.g. non-finite logits) ends that request with finish reason
    "error" and frees its blocks without caching them; the batch's other requests go on."""
    core, q = make_core()
    core.add_request(req("bad", 10, max_tokens=5))
    core.add_request(req("good", 10, max_tokens=5, base=100))
    core.submit()
    result = q.wait()
    result.sampled.pop("bad")
    result.errors["bad"] = "logits not finite"
    outs = core.process(result)
    bad = [o for o in outs if o.request_id == "bad"]
    assert len(bad) == 1 and bad[0].finish_reason == "error" and bad[0].error == "logits not finite"
    assert bad[0].metrics is not None  # its first output carries its timing record
    outs += drain(core)
    assert [o.finish_reason for o in outs if o.request_id == "good"][-1] == "length"
    assert len([t for o in outs if o.request_id == "good" for t in o.new_token_ids]) == 5
    alloc = core.scheduler.allocator
    assert alloc.num_free == alloc.num_blocks  # every block back
    assert alloc.cached_prefix(list(range(1, 11)), []) == []  # the failed prompt's K/V are not cached for reuse
    assert alloc.cached_prefix(list(range(101, 111)), [])  # the good one's are


def test_chunked_prefill_respects_token_budget():
    core, q = make_core(max_num_batched_tokens=8)
    core.add_request(req("a", 20, max_tokens=2))
    core.add_request(req("b", 3, max_tokens=2, base=100))
    drain(core)
    assert all(b.num_tokens <= 8 for b in q.submitted)
    first = core.trace[:3]
    assert first[0][1] == (("a", 8),)
    assert first[1][1] == (("a", 8),)
    assert first[2][1] == (("a", 4), ("b", 3))


def test_max_processing_samples_caps_running_set():
    core, q = make_core(max_processing_samples=2)
    for i in range(5):
        core.add_request(req(f"r{i}", 3, max_tokens=3, base=10 * i))
    while core.has_unfinished():
        core.step()
        assert len(core.scheduler.running) <= 2
    assert max(len(b.sequences) for b in q.submitted) <= 2


def test_spare_blocks_ratio_holds_back_admission():
    core, _ = make_core(num_blocks=20, spare_blocks_ratio=0.5)
    core.add_request(req("a", 16, max_tokens=2))  # 4 blocks
    core.add_request(req("b", 16, max_tokens=2, base=100))  # 4 more would leave 12 >= 10
    core.add_request(req("c", 16, max_tokens=2, base=200))  # 4 more would leave 8 < 10: waits
    core.step()
    assert [r.request_id for r in core.scheduler.running] == ["a", "b"]
    assert [r.request_id for r in core.scheduler.waiting] == ["c"]
    drain(core)


def test_preemption_by_recompute_gives_same_tokens():
    small, _ = make_core(num_blocks=6, block_size=4)
    big, _ = make_core(num_blocks=200, block_size=4)
    for core in (small, big):
        for i in range(4):
            core.add_request(req(f"r{i}", 6, max_tokens=8, base=10 * i))
    outs_small, outs_big = drain(small), drain(big)
    assert small.scheduler.stats.num_preemptions > 0
    assert big.scheduler.stats.num_preemptions == 0

    def tokens(outs):
        d = {}
        for o in outs:
            d.setdefault(o.request_id, []).extend(o.new_token_ids)
        return d

    assert tokens(outs_small) == tokens(outs_big)
    assert small.scheduler.allocator.num_free == small.scheduler.allocator.num_blocks


def test_fcfs_admission_order():
    core, _ = make_core(max_processing_samples=1)
    for i in range(3):
        core.add_request(req(f"r{i}", 3, max_tokens=1, base=10 * i))
    order = [o.request_id for o in drain(core) if o.finished]
    assert order == ["r0", "r1", "r2"]


def test_eos_stop_token_min_tokens_and_ignore_eos():
    core, _ = make_core(eos=3, eos_after={"a": 2, "b": 2, "c": 2})
    core.add_request(req("a", 3, max_tokens=10))
    core.add_request(req("b", 3, max_tokens=10, base=10, min_tokens=5))
    core.add_request(req("c", 3, max_tokens=6, base=20, ignore_eos=True))
    ends = {o.request_id: o for o in drain(core) if o.finished}
    assert ends["a"].finish_reason == "stop" and ends["a"].stop_reason is None
    assert ends["b"].finish_reason == "stop"
    assert core.scheduler.stats.num_generated_tokens == 2 + 5 + 6


def test_abort_frees_blocks_at_once_and_late_result_is_harmless():
    core, q = make_core(limit=2)
    core.add_request(req("a", 9, max_tokens=50))
    core.add_request(req("b", 9, max_tokens=3, base=50))
    core.submit()
    assert q.in_flight == 1
    assert core.abort("a").status is RequestStatus.FINISHED_ABORTED
    assert core.abort("a") is None and core.abort("nope") is None
    assert all(core.scheduler.allocator.blocks[b].ref_count <= 1 for b in range(core.scheduler.allocator.num_blocks))
    drain(core)
    assert core.scheduler.allocator.num_free == core.scheduler.allocator.num_blocks


def test_duplicate_live_id_rejected():
    core, _ = make_core()
    core.add_request(req("a", 3))
    with pytest.raises(ValueError, match="already"):
        core.add_request(req("a", 3))


def test_prefix_cache_hit_reuses_blocks():
    core, _ = make_core(num_blocks=32, block_size=4)
    core.add_request(req("a", 13, max_tokens=1))
    drain(core)
    core.add_request(req("b", 13, max_tokens=1))
    core.step()
    assert core.scheduler.stats.num_cached_tokens == 12
    drain(core)


def test_one_slot_has_one_batch_in_flight_whatever_the_queue_limit():
    # a second batch beside the first would hold only the requests the first does not (a late arrival), and
    # they would go on decoding apart in batches of their own, each reading the weights again (before: the
    # late request decoded alone in every other batch; found by a fresh user as 8B on one card losing 40% of
    # its throughput at npu_queue_limit 2, 80% at 8)
    core, q = make_core(limit=2)
    for i in range(2):
        core.add_request(req(f"r{i}", 3, max_tokens=6, base=10 * i))
    core.submit()
    assert q.in_flight == 1  # both requests went into one batch
    core.add_request(req("late", 3, max_tokens=6, base=90))
    core.submit()
    assert q.in_flight == 1  # the late request waits for the slot's batch
    drain(core)
    trace = core.scheduler.trace
    assert trace[:2] == [(0, (("r0", 3), ("r1", 3))), (1, (("r0", 1), ("r1", 1), ("late", 3)))]
    # then all three decode together until r0 and r1 (a step ahead) end
    assert [b for _, b in trace[2:]] == [(("r0", 1), ("r1", 1), ("late", 1))] * 4 + [(("late", 1),)]


def test_allocator_accounting():
    a = BlockAllocator(8, 4)
    t1 = BlockTable()
    assert a.admit(t1, list(range(10)), [])
    assert len(t1) == 3 and a.num_free == 5
    assert not a.admit(BlockTable(), list(range(40)), [])
    a.commit(t1, list(range(10)), 8)
    hits = a.cached_prefix(list(range(10)))
    assert hits == t1.ids[:2]
    t2 = BlockTable()
    assert a.admit(t2, list(range(10)), hits)
    assert a.blocks[t1.ids[0]].ref_count == 2
    a.free(t1)
    a.free(t2)
    assert a.num_free == 8
    assert a.cached_prefix(list(range(10))) == hits  # freed blocks stay cached until reused

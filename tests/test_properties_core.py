"""Property-based tests of the scheduler, the block allocator and the request lifecycle.

A ``RuleBasedStateMachine`` drives ``EngineCore`` on a fake device at the HAL seam (no model)
through random interleavings of arrivals, aborts, submissions and completions, and checks the
invariants listed in ``tests/INVARIANTS.md`` after every rule.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import event, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from furiosa_llm.core import BucketState, EngineCore, JitConfig, JitPolicy, Request, RequestStatus, Scheduler, SchedulerConfig
from furiosa_llm.core.block_allocator import chain_hash

from fakes import FakeQueue

EOS = 7


class CoreMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(4, 40),
        block_size=st.sampled_from([1, 2, 4, 8]),
        budget=st.integers(1, 48),
        max_samples=st.integers(1, 6),
        spare=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
        limit=st.integers(1, 3),
        prefix_caching=st.booleans(),
        jit=st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(2, 4))),
        slots=st.integers(1, 3),
    )
    def setup(self, num_blocks, block_size, budget, max_samples, spare, limit, prefix_caching, jit, slots):
        self.cfg = SchedulerConfig(
            num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=budget,
            max_processing_samples=max_samples, spare_blocks_ratio=spare,
            max_model_len=num_blocks * block_size, enable_prefix_caching=prefix_caching,
            num_batch_slots=min(slots, limit),  # as EngineArgs maps them: slots only with a deeper queue
        )
        self.sched = Scheduler(self.cfg, eos_token_ids=frozenset({EOS}))
        self.queue = FakeQueue(limit)
        self.jit = None
        if jit is not None:  # (threshold, max_workers, unit_size); small edges so shapes share buckets
            self.jit = JitPolicy(JitConfig(True, jit[0], jit[1], jit[2], batch_edges=(1, 2, 4, 8),
                                           length_edges=(16, 64, 256, 1024)), num_layers=5)
        self.core = EngineCore(self.sched, self.queue, clock=lambda: self.queue.now, jit=self.jit)
        self.next_id = 0
        self.added: list[str] = []  # arrival order
        self.admitted: list[str] = []  # first admission order
        self.ended: set[str] = set()
        self.last_computed: dict[str, tuple[int, int]] = {}

    # ---- rules ---------------------------------------------------------------------------------
    @rule(data=st.data(), prompt_len=st.integers(1, 30), max_tokens=st.integers(1, 12),
          shared_prefix=st.booleans(), ignore_eos=st.booleans())
    def add(self, data, prompt_len, max_tokens, shared_prefix, ignore_eos):
        max_tokens = min(max_tokens, self.cfg.max_model_len - 1)
        prompt_len = min(prompt_len, self.cfg.max_model_len - max_tokens)
        if shared_prefix:  # many requests share a prefix: exercises prefix caching
            prompt = [(i % 5) + 20 for i in range(prompt_len)]
        else:
            prompt = data.draw(st.lists(st.integers(10, 60), min_size=prompt_len, max_size=prompt_len))
        rid = f"r{self.next_id}"
        self.next_id += 1
        min_tokens = data.draw(st.integers(0, max_tokens))
        self.core.add_request(Request(rid, prompt, max_tokens=max_tokens, arrival_time=self.queue.now,
                                      min_tokens=min_tokens, ignore_eos=ignore_eos,
                                      stop_token_ids=frozenset({11, 12})))
        self.added.append(rid)

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data())
    def duplicate_id_is_rejected(self, data):
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        try:
            self.core.add_request(Request(rid, [1, 2], max_tokens=1, arrival_time=0.0))
        except ValueError as e:
            assert rid in str(e)
        else:
            raise AssertionError("duplicate live id accepted")

    @rule(data=st.data())
    def abort(self, data):
        choices = sorted(self.sched.requests) + sorted(self.ended)[:3] + ["unknown"]
        rid = data.draw(st.sampled_from(choices))
        live = rid in self.sched.requests
        req = self.sched.requests.get(rid)
        blocks = list(req.block_ids) if req else []
        before = Counter(b for r in self.sched.requests.values() for b in r.block_ids)
        got = self.core.abort(rid)
        assert (got is not None) == live
        if live:
            self.ended.add(rid)
            assert got.status is RequestStatus.FINISHED_ABORTED and got.block_ids == []
            after = Counter(b for r in self.sched.requests.values() for b in r.block_ids)
            assert before - after == Counter(blocks)  # exactly its blocks were released

    @rule()
    def submit(self):
        # EngineCore.submit itself, with a hook that checks each scheduling decision as it is made
        before = {"running": list(self.sched.running), "waiting": list(self.sched.waiting)}

        def check(batch):
            running_before, waiting_before = before["running"], before["waiting"]
            if batch.bucket is not None:
                assert self.jit.state(batch.bucket) is BucketState.READY
                event("a step ran on a compiled bucket")
            assert 0 < batch.num_tokens <= self.cfg.max_num_batched_tokens
            assert len(batch.sequences) <= self.cfg.max_processing_samples  # the cap holds per step
            if self.cfg.num_batch_slots > 1:  # a batch serves one slot: its requests belong to no other batch
                assert len({c.owner.slot for c in batch.sequences}) == 1
                slots = [b.sequences[0].owner.slot for b in self.sched.in_flight.values()]
                assert len(slots) == len(set(slots)), "a slot with two batches in flight"
            else:  # one slot, one batch in flight, whatever the queue limit
                assert len(self.sched.in_flight) == 1, "two batches in flight on one slot"
            in_flight = [c.request_id for b in self.sched.in_flight.values() for c in b.sequences]
            assert len(in_flight) == len(set(in_flight)), "a request in two batches in flight"
            newly = [r for r in waiting_before if r.status is RequestStatus.RUNNING]
            for r in newly:
                if r.request_id not in self.admitted and r.num_preemptions == 0:
                    self.admitted.append(r.request_id)
            if newly:
                assert not any(r.status is RequestStatus.PREEMPTED for r in running_before), "admitted after a preemption"
                if self.cfg.num_batch_slots > 1:  # a slot admits up to its fair share of the live requests
                    share = -(-(len(running_before) + len(waiting_before)) // self.cfg.num_batch_slots)
                    assert self.sched.slot_sizes[newly[0].slot] <= share, (self.sched.slot_sizes, share)
                if running_before or len(newly) > 1:
                    # only a request entering an empty running set may dip into the spare blocks
                    spare = self.cfg.spare_blocks_ratio * self.cfg.num_blocks
                    assert self.sched.allocator.num_free >= spare, (self.sched.allocator.num_free, spare)
            before["running"], before["waiting"] = list(self.sched.running), list(self.sched.waiting)

        self.core.submit(on_batch=check)
        assert self.queue.in_flight <= self.queue.limit

    @precondition(lambda self: self.queue.in_flight)
    @rule()
    def complete(self):
        for out in self.core.process(self.queue.wait()):
            if out.finished:
                self.ended.add(out.request_id)

    @precondition(lambda self: self.queue.compiling)
    @rule(data=st.data(), ok=st.booleans())
    def end_compilation(self, data, ok):
        i = data.draw(st.integers(0, len(self.queue.compiling) - 1))
        self.queue.end_compile(i, ok)
        event("a compilation failed" if not ok else "a compilation succeeded")

    @rule()
    def step(self):
        self.submit()
        if self.queue.in_flight:
            self.complete()

    # ---- invariants ----------------------------------------------------------------------------
    @invariant()
    def allocator_accounts_for_every_block(self):
        if not hasattr(self, "sched"):
            return
        alloc = self.sched.allocator
        free = alloc.free_block_ids
        assert len(free) == len(set(free)) == alloc.num_free
        held = Counter(b for r in self.sched.requests.values() for b in r.block_ids)
        for blk in alloc.blocks:
            assert blk.ref_count == held.get(blk.block_id, 0), (blk, held.get(blk.block_id))
            assert (blk.ref_count == 0) == (blk.block_id in set(free))
        assert alloc.num_free + len(held) == alloc.num_blocks
        for r in self.sched.running:  # a block is offered to the prefix cache only once its K/V are computed
            for i, bid in enumerate(r.block_ids):
                if alloc.blocks[bid].hash is not None:
                    assert r.num_computed_tokens >= (i + 1) * alloc.block_size, (r.request_id, i, r.num_computed_tokens)
        for h, bid in alloc.hash_to_block.items():  # cached content is what the hash says
            blk = alloc.blocks[bid]
            assert blk.hash == h and len(blk.token_ids) == alloc.block_size
        for blk in alloc.blocks:  # a block has a hash exactly while the cache maps that hash to it
            assert blk.hash is None or alloc.hash_to_block.get(blk.hash) == blk.block_id

    @invariant()
    def prefix_hits_match_content(self):
        if not hasattr(self, "sched"):
            return
        alloc = self.sched.allocator
        for r in self.sched.waiting:
            prev = None
            for i, bid in enumerate(alloc.cached_prefix(r.token_ids)):
                tokens = tuple(r.token_ids[i * alloc.block_size : (i + 1) * alloc.block_size])
                assert alloc.blocks[bid].token_ids == tokens
                prev = chain_hash(prev, tokens)
                assert alloc.blocks[bid].hash == prev

    @invariant()
    def scheduler_bounds(self):
        if not hasattr(self, "sched"):
            return
        s = self.sched
        assert len(s.running) <= self.cfg.max_processing_samples * self.cfg.num_batch_slots
        for k in range(self.cfg.num_batch_slots):  # each slot's count is its running requests, within the cap
            members = [r for r in s.running if r.slot == k]
            assert s.slot_sizes[k] == len(members) <= self.cfg.max_processing_samples
        assert len(s.in_flight) == self.queue.in_flight <= self.queue.limit
        assert set(s.requests) == {r.request_id for r in s.running} | {r.request_id for r in s.waiting}
        for r in s.running:
            assert r.status is RequestStatus.RUNNING
            assert len(r.block_ids) * self.cfg.block_size >= max(r.num_computed_tokens, 1)
            assert r.num_computed_tokens <= r.num_tokens
        for r in s.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and not r.block_ids
            assert r.num_computed_tokens == 0
        assert self.admitted == [rid for rid in self.added if rid in self.admitted], "admission is not FCFS"

    @invariant()
    def jit_bounds(self):
        if getattr(self, "jit", None) is None:
            return
        cfg = self.jit.config
        # never more than max_workers compilations at once
        unreported = len(self.queue._done_compiles)  # ended on the device, not yet polled by the core
        assert self.jit.compiling == len(self.queue.compiling) + unreported <= cfg.max_workers
        # a bucket compiles once: a ready (or failed) bucket never recompiles
        assert len(self.queue.compile_log) == len(set(self.queue.compile_log))
        for bucket in self.queue.compile_log:
            # only after jit_threshold hits
            assert self.jit.buckets[bucket].hits >= cfg.threshold
        for bucket, entry in self.jit.buckets.items():
            if entry.state is BucketState.READY:
                assert bucket in self.queue.ready
            if entry.state is BucketState.FAILED:  # disabled cleanly: never runs compiled, never queued again
                assert bucket not in self.queue.ready and bucket not in self.jit.queue and entry.error
            if entry.state is BucketState.COUNTING:
                assert entry.hits < cfg.threshold
        s = self.jit.stats
        assert s.compilations_started == len(self.queue.compile_log)
        assert s.compilations_finished + s.compilations_failed + self.jit.compiling == s.compilations_started

    @invariant()
    def computed_tokens_only_grow_except_preemption(self):
        if not hasattr(self, "sched"):
            return
        for rid, r in self.sched.requests.items():
            prev, prev_pre = self.last_computed.get(rid, (0, 0))
            if r.num_preemptions == prev_pre:
                assert r.num_computed_tokens >= prev
            else:
                assert r.num_preemptions > prev_pre
            self.last_computed[rid] = (r.num_computed_tokens, r.num_preemptions)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # arrivals stop: everything must end within a bounded number of steps
        total = sum(r.num_tokens + r.max_tokens for r in self.sched.requests.values())
        bound = 10 + 4 * total * (len(self.sched.requests) + 1)
        for _ in range(bound):
            if not self.core.has_unfinished():
                break
            self.step()
        assert not self.core.has_unfinished(), "requests did not drain"
        assert not self.sched.running and not self.sched.waiting and not self.sched.requests
        assert not self.sched.in_flight and self.queue.in_flight == 0
        assert self.sched.allocator.num_free == self.sched.allocator.num_blocks


TestCoreMachine = CoreMachine.TestCase

"""The simulated deployment: engine-core replicas on virtual RNGD cards, and the requests that reach them.

Scenario:
  A deployment serves a workload with data-parallel replicas. Each replica is one
  ``EngineCore`` (the production scheduler, KV block allocator and JIT policy) over a
  ``SimQueue``: a step occupies the replica's pipeline stages for the cost model's device
  time, then costs host time (scheduling, sampling, detokenizing) before its outputs reach
  users. Requests arrive as the workload says. One longer than the context is refused; the
  others go where the routing policy says (``furiosa_llm.core.routing``, the same objects the
  real engine's data-parallel front uses): the replica with the fewest live requests
  (``least_loaded``), the least outstanding work in tokens (``least_tokens``) or replica
  ``i % replicas`` (``round_robin``).

Entities start their own SimPy processes: a ``Replica`` steps its core while it has work and
sleeps until a request comes; the ``Frontend`` makes each request when it arrives and
dispatches it. Every measurement goes to a ``MetricsRecorder``. ``run`` simulates some of the
replicas: all of them, or one worker's share of round-robin replicas (which never interact).
"""

from __future__ import annotations

import gc
from typing import Callable

import numpy as np
import simpy

from furiosa_llm.core import EngineCore, Request
from furiosa_llm.core.routing import ROUTING_POLICIES, Router, make_router
from furiosa_llm.hal import BatchExecutor
from furiosa_llm.hal.simulator import SimQueue, SyntheticTokens

from .config import SimPlan
from .metrics import MetricsRecorder
from .workload import Arrivals, Workload

DISPATCH = ROUTING_POLICIES
PROMPT_POOL = 1 << 20  # synthetic prompts are random windows of one seeded pool of token ids
# ... drawn below 256: CPython keeps one object per small int, so the prefix cache's hashing of a prompt's
# blocks reads a few hot objects, not a megabyte-scale pool of cold ones (~6% of a 4,000-request run's wall
# time). Prompt values do not enter the cost model, and a 16-token block of random ids still never repeats
PROMPT_VOCAB = 256


class Replica:
    """One data-parallel replica: an ``EngineCore`` stepping on a ``SimQueue``."""

    def __init__(self, env: simpy.Environment, index: int, plan: SimPlan, tokens: BatchExecutor,
                 recorder: MetricsRecorder, *, record_trace: bool = False,
                 on_done: Callable[[int], None] | None = None, router: Router | None = None) -> None:
        self.env = env
        self.router = router  # told of every request's progress and end
        self.index = index
        self.placement = plan.placements[index]
        self.recorder = recorder
        self.on_done = on_done  # told how many requests completed in a step (a progress bar)
        self.queue = SimQueue(env, plan.model, plan.cost, tokens, limit=plan.engine_config.npu_queue_limit,
                              num_stages=len(self.placement.stages), jit=plan.engine_config.jit_config.enabled)
        self.core = EngineCore.from_config(plan.engine_config, self.queue, lambda: env.now, num_layers=plan.model.num_layers,
                                           record_trace=record_trace)
        self._wake: simpy.Event | None = None  # set while the replica sleeps with no work
        self.process = env.process(self.serve())

    def add(self, request: Request) -> None:
        self.core.add_request(request)
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.succeed()

    def serve(self):
        """Fill the queue, wait for the oldest batch's outputs (device and host time), fold them in; sleep when idle."""
        env, core, queue, recorder = self.env, self.core, self.queue, self.recorder
        while True:
            core.submit()
            if not queue.in_flight:
                self._wake = env.event()
                yield self._wake
                continue
            yield queue.oldest()  # the step's outputs on the host: the device's time, then the host's
            outputs = core.process(queue.wait())
            if self.router is not None:
                self.router.on_core_outputs(outputs)
            done = recorder.on_outputs(outputs)
            recorder.on_step(self.index, env.now, core.num_kv_blocks_used)
            if done and self.on_done is not None:
                self.on_done(done)


class Frontend:
    """Where requests come in: each made at its arrival time with a synthetic prompt and sent to a replica."""

    def __init__(self, env: simpy.Environment, arrivals: Arrivals, seed: int, plan: SimPlan,
                 replicas: dict[int, Replica], recorder: MetricsRecorder, router: Router,
                 on_done: Callable[[int], None] | None = None) -> None:
        self.env = env
        self.arrivals = arrivals
        self.plan = plan
        self.replicas = replicas  # the replicas simulated here, by index
        self.recorder = recorder
        self.router = router
        self.on_done = on_done
        rng = np.random.default_rng(seed)
        # the longest prompt that can be admitted (a longer one is refused on arrival and never made), so the pool
        # stays small however long a refused prompt is
        max_in = min(int(arrivals.input_lens.max()), plan.max_model_len)
        self.pool = rng.integers(2, min(PROMPT_VOCAB, plan.model.vocab_size), size=max(PROMPT_POOL, 2 * max_in)).tolist()
        self.offsets = rng.integers(0, len(self.pool) - max_in, size=len(arrivals)).tolist()
        self.process = env.process(self.arrive())

    def arrive(self):
        env, a, recorder, replicas, pool = self.env, self.arrivals, self.recorder, self.replicas, self.pool
        router = self.router
        round_robin = router.name == "round_robin"
        num_replicas, max_model_len = self.plan.num_replicas, self.plan.max_model_len
        budget = self.plan.engine_config.scheduler_config.max_num_batched_tokens  # a pooling prompt runs whole
        embed = a.pooling.tolist() if a.pooling is not None else None
        times, ins, outs, offsets = a.arrived_at.tolist(), a.input_lens.tolist(), a.output_lens.tolist(), self.offsets
        for i in range(len(times)):
            if round_robin and i % num_replicas not in replicas:
                continue  # another worker's replica
            delay = times[i] - env.now
            if delay > 0:
                yield env.timeout(delay)
            n_in, n_out = ins[i], outs[i]
            is_embed = embed is not None and embed[i]
            if (n_in > min(max_model_len, budget)) if is_embed else (n_in + n_out > max_model_len):
                recorder.on_reject(env.now)
                if self.on_done is not None:
                    self.on_done(1)
                continue
            rid, off = f"r{i}", offsets[i]
            req = (Request(rid, pool[off : off + n_in], max_tokens=1, arrival_time=env.now, pooling=True) if is_embed else
                   Request(rid, pool[off : off + n_in], max_tokens=n_out, arrival_time=env.now, ignore_eos=True))
            recorder.on_arrival(rid, env.now, n_in, index=i)
            target = router.choose(n_in + n_out, index=i)
            router.add(target, rid, n_in, n_out)
            replicas[target].add(req)


def run(plan: SimPlan, workload: Workload, replica_ids: list[int], *, dispatch: str = "least_tokens",
        tokens: BatchExecutor | None = None, record_trace: bool = False,
        progress: bool = False) -> tuple[MetricsRecorder, dict[int, list]]:
    """Simulate replicas ``replica_ids`` of ``plan`` serving ``workload``: the recorder and each replica's trace."""
    env = simpy.Environment()
    recorder = MetricsRecorder()
    arrivals = workload.generate()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(arrivals), unit="req", desc="simulating", mininterval=0.5)
    on_done = None if bar is None else bar.update
    tokens = tokens or SyntheticTokens()
    router = make_router(dispatch, plan.num_replicas)
    replicas = {i: Replica(env, i, plan, tokens, recorder, record_trace=record_trace, on_done=on_done, router=router)
                for i in replica_ids}
    Frontend(env, arrivals, workload.seed + 1, plan, replicas, recorder, router, on_done)
    # the run allocates a few objects per request and step and frees them itself (no reference cycles
    # build up): the cyclic garbage collector's passes over them are ~10% of the run's instructions
    # (callgrind, 300 requests), so it is paused for the run and restored after
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        env.run()
    finally:
        if was_enabled:
            gc.enable()
    if bar is not None:
        bar.close()
    recorder.on_end()
    for i, r in replicas.items():
        recorder.on_replica_end(i, str(r.placement), r.core.stats(), r.queue.busy_s, r.queue.usage())
    return recorder, ({i: r.core.trace for i, r in replicas.items()} if record_trace else {})

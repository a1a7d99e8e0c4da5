"""The simulator backend: virtual RNGD cards in a SimPy environment.

``place_replicas`` maps device strings onto data-parallel replicas of pipeline stages, each
stage a tensor-parallel group of PEs. ``SimQueue`` is the execution queue of one replica: a
batch passes through the stages in order, each stage busy for its share of the step time the
cost model gives, so with ``npu_queue_limit`` > 1 batches overlap in the pipeline. Time is the
SimPy environment's ``env.now``; the engine core reads it as its clock. Steps and JIT
compilations are both SimPy timeouts: a step's fires with its ``StepResult`` when its outputs
are ready on the host, ``host_s`` (the host time the cost model gives: sampling, detokenizing)
after the device's ``finished_at``; when a compilation's fires, ``compiled()`` reports its
``CompileResult``.

Tokens come from a ``BatchExecutor``: ``SyntheticTokens`` for planning (output lengths come
from the workload), or the torch ``ModelRunner`` for functional runs with real text.
"""

from __future__ import annotations

import collections
import operator
from dataclasses import dataclass

from .batch import Batch, Bucket, CompileResult, StepResult
from .cost_model import BatchShape, CostModel, ModelShape
from .devices import FUSED_SPANS, PES_PER_CARD, CoreRange, Device, format_devices
from .queue import BatchExecutor, ExecutionQueue, QueueFullError


@dataclass(frozen=True, slots=True)
class ReplicaPlacement:
    """One data-parallel replica: ``stages[i]`` are the PEs of pipeline stage ``i``."""

    stages: tuple[tuple[Device, ...], ...]

    def __str__(self) -> str:
        return " | ".join(format_devices(list(s)) for s in self.stages)


def _free_pes(devices: list[Device]) -> dict[int, set[int]]:
    cards: dict[int, set[int]] = collections.defaultdict(set)
    for d in devices:
        if d.kind != "npu":
            raise ValueError(f"devices={format_devices(devices)!r}: the simulator models RNGD cards; use npu:X[...] devices")
        lo, hi = (0, PES_PER_CARD - 1) if d.cores is None else (d.cores.start, d.cores.end)
        cards[d.index].update(range(lo, hi + 1))
    return dict(sorted(cards.items()))


def place_replicas(devices: list[Device], tensor_parallel_size: int = PES_PER_CARD, pipeline_parallel_size: int = 1,
                   data_parallel_size: int | None = None) -> list[ReplicaPlacement]:
    """Split the PEs of ``devices`` into replicas of ``pipeline_parallel_size`` stages of ``tensor_parallel_size`` PEs.

    A stage of fewer than 8 PEs is an aligned fused range on one card; a stage of 8k PEs is k
    whole cards; the stages of one replica sit on different cards. ``data_parallel_size=None``
    fills the PEs with as many replicas as fit.
    """
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if tp < 1 or (tp < PES_PER_CARD and tp not in FUSED_SPANS) or (tp > PES_PER_CARD and tp % PES_PER_CARD):
        raise ValueError(f"tensor_parallel_size={tp}: must be 1, 2, 4 or a multiple of {PES_PER_CARD}")
    if pp < 1:
        raise ValueError(f"pipeline_parallel_size={pp}: must be >= 1")
    if data_parallel_size is not None and data_parallel_size < 1:
        raise ValueError(f"data_parallel_size={data_parallel_size}: must be >= 1")
    free = _free_pes(devices)
    available = sum(len(p) for p in free.values())
    replicas: list[ReplicaPlacement] = []
    if tp >= PES_PER_CARD:
        whole = [c for c, pes in free.items() if len(pes) == PES_PER_CARD]
        per_stage = tp // PES_PER_CARD
        while len(whole) >= per_stage * pp and (data_parallel_size is None or len(replicas) < data_parallel_size):
            stages = []
            for _ in range(pp):
                cards, whole = whole[:per_stage], whole[per_stage:]
                stages.append(tuple(Device("npu", c) for c in cards))
            replicas.append(ReplicaPlacement(tuple(stages)))
    else:
        slots = {c: [s for s in range(0, PES_PER_CARD, tp) if set(range(s, s + tp)) <= pes] for c, pes in free.items()}
        while data_parallel_size is None or len(replicas) < data_parallel_size:
            cards = sorted((c for c in slots if slots[c]), key=lambda c: (-len(slots[c]), c))[:pp]
            if len(cards) < pp:
                break
            stages = []
            for c in sorted(cards):
                s = slots[c].pop(0)
                stages.append((Device("npu", c, CoreRange(s, s + tp - 1)),))
            replicas.append(ReplicaPlacement(tuple(stages)))
    dp = data_parallel_size or 1
    if not replicas or len(replicas) < dp:
        raise ValueError(
            f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} x data_parallel_size={dp} requires {tp * pp * dp} "
            f"PEs ({pp} stage(s) on different cards per replica); devices {format_devices(devices)!r} give {available} "
            f"PEs on {len(free)} card(s), enough for {len(replicas)} replica(s)"
        )
    return replicas


def unused_devices(devices: list[Device], placements: list[ReplicaPlacement]) -> str:
    """The devices, or PEs of a card, that ``devices`` give and no replica of ``placements`` uses, as text
    (``"npu:3"``, ``"npu:0 PEs 4-7"``); "" when every one is used."""
    used = [d for r in placements for stage in r.stages for d in stage]
    if any(d.kind != "npu" for d in devices):  # cpu/cuda: one replica per device
        return format_devices([d for d in devices if d not in used])
    given, taken = _free_pes(devices), _free_pes(used)
    parts = []
    for card, pes in given.items():
        left = sorted(pes - taken.get(card, set()))
        if len(left) == PES_PER_CARD:
            parts.append(f"npu:{card}")
        elif left:
            runs = [[left[0], left[0]]]
            for pe in left[1:]:
                if pe == runs[-1][1] + 1:
                    runs[-1][1] = pe
                else:
                    runs.append([pe, pe])
            parts.append(f"npu:{card} PEs " + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs))
    return ", ".join(parts)


MAX_STEP_S = 1e6  # seconds: a step past this (11 days) comes from a profile's absurd figures, not from hardware


class SyntheticTokens:
    """Token source for planning: every sampled token is ``token_id`` (never an EOS of the run); a pooling
    chunk gets an empty vector (its cost, prefill only, is the cost model's; its values do not matter).

    A request with structured outputs (``sampling.structured``, a grammar state) gets tokens its
    grammar allows instead (``synthetic_token``), so its matcher does the work it does when serving.
    """

    def __init__(self, token_id: int = 1) -> None:
        self.token_id = token_id

    def execute(self, batch: Batch) -> StepResult:
        seqs = batch.sequences
        out = dict.fromkeys([s.request_id for s in seqs if s.sample], self.token_id)
        if any(map(_structured, seqs)):
            for s in seqs:
                g = s.sampling.structured
                if g is not None and s.sample:
                    out[s.request_id] = g.synthetic_token(s.num_output_tokens, s.output_token_ids)
        pooled = {s.request_id: [] for s in seqs if s.pool} if any(map(_pool, seqs)) else {}
        return StepResult(batch.step_id, out, pooled=pooled)


_structured, _pool = operator.attrgetter("sampling.structured"), operator.attrgetter("pool")


class SimQueue(ExecutionQueue):
    """Execution queue of one simulated replica: in-order, pipelined over its stages."""

    def __init__(self, env, model: ModelShape, cost: CostModel, tokens: BatchExecutor, limit: int = 1,
                 num_stages: int = 1, jit: bool = False) -> None:
        super().__init__(limit)
        self.jit = jit  # JIT on: uncompiled decode steps take the slow path
        if num_stages < 1:
            raise ValueError(f"num_stages={num_stages}: must be >= 1")
        self.env = env
        self.model = model
        self.cost = cost
        self.tokens = tokens
        self._stage_free_at = [0.0] * num_stages
        self._stage_share = model.stage_share(num_stages)  # the largest stage's share of the layers
        self._pending: collections.deque = collections.deque()  # SimPy events of the batches in flight
        self.busy_s = 0.0  # device seconds of the first stage (utilisation numerator)
        self.num_batches = 0
        self.num_seqs = 0  # sequences over all batches (mean batch size = num_seqs / num_batches)
        self.bound_s = {"compute": 0.0, "weights": 0.0, "kv": 0.0}  # stage seconds by what bounded the step
        self.tp_comm_s = 0.0  # stage seconds in tensor-parallel all-reduces across cards
        self.stage_transfer_s = 0.0  # stage seconds sending activations to the next pipeline stage

    def step_times(self, batch: Batch) -> tuple[float, float]:
        """(device seconds per stage, host seconds) of one batch; accounts where the device time goes."""
        shape = BatchShape.of(batch)
        p = len(self._stage_free_at)
        cost = self.cost.breakdown(self.model, shape)
        slow = self.cost.jit_slow_factor if self.jit and batch.bucket is None and shape.num_tokens == shape.num_seqs else 1.0
        # every stage takes as long as the largest (the pipeline's pace); a decode step without its compiled bucket
        # runs slow (JIT)
        device = cost.total * slow * self._stage_share
        comm = cost.tp_comm * slow * self._stage_share
        transfer = self.cost.stage_transfer_time(shape) if p > 1 else 0.0
        host = self.cost.host_time(shape)
        if not device + transfer + host < MAX_STEP_S:  # also inf and NaN: figures whose products overflow a float
            raise ValueError(
                f"cost model {self.cost.name!r}: a step of {shape.num_seqs} sequence(s) and {shape.num_tokens} token(s) "
                f"takes {device + transfer + host!r} s (fixed {cost.fixed:g}, compute {cost.compute:g}, weights "
                f"{cost.weights:g}, KV {cost.kv:g}, all-reduce {cost.tp_comm:g}, host {host:g} s); a profile's figures "
                f"must keep every step under {MAX_STEP_S:g} s")
        self.num_seqs += shape.num_seqs
        self.bound_s[cost.bound] += device - comm  # the step's own work, by what bounds it
        self.tp_comm_s += comm
        self.stage_transfer_s += transfer
        return device + transfer, host

    def usage(self) -> dict:
        """Where the first stage's time went: seconds of the steps' own work by what bounded it, seconds in
        all-reduces across cards, seconds sending to the next stage (busy = bound + all-reduces + sends),
        and the batches' sizes."""
        return {"compute_bound_s": self.bound_s["compute"], "weight_bandwidth_bound_s": self.bound_s["weights"],
                "kv_bandwidth_bound_s": self.bound_s["kv"], "tp_comm_s": self.tp_comm_s,
                "stage_transfer_s": self.stage_transfer_s, "busy_s": self.busy_s,
                "num_batches": self.num_batches, "num_seqs": self.num_seqs}

    def compile(self, bucket: Bucket, num_units: int) -> None:
        """A compilation runs beside serving: a timeout of ``num_units x jit_compile_s_per_unit`` seconds.

        When the environment processes it, its result joins those ``compiled()`` reports next.
        """
        secs = num_units * self.cost.jit_compile_s_per_unit
        done = self.env.timeout(secs, value=CompileResult(bucket, True, secs))
        done.callbacks.append(self._compile_ended)

    def _compile_ended(self, event) -> None:
        self._done_compiles.append(event.value)

    def submit(self, batch: Batch) -> None:
        if len(self._pending) >= self.limit:
            raise QueueFullError(f"{len(self._pending)} batches in flight; npu_queue_limit={self.limit}")
        now = self.env.now
        per_stage, host = self.step_times(batch)
        ready = now
        started = None
        for i, free_at in enumerate(self._stage_free_at):
            start = max(ready, free_at)
            started = start if started is None else started
            ready = start + per_stage
            self._stage_free_at[i] = ready
        result = self.tokens.execute(batch)  # batches complete in submission order, so tokens can be made now
        result.step_id = batch.step_id
        result.started_at = started
        result.finished_at = ready
        result.host_s = host
        self.busy_s += per_stage
        self.num_batches += 1
        self._pending.append(self.env.timeout(ready + host - now, value=result))  # the outputs reach the host

    def oldest(self):
        """The SimPy event that fires with the oldest in-flight batch's result (``yield`` it in a process)."""
        if not self._pending:
            raise RuntimeError("no batch in flight")
        return self._pending[0]

    def wait(self) -> StepResult:
        """The oldest result; outside a SimPy process this runs the simulation until it is ready."""
        ev = self.oldest()
        if not ev.processed:
            self.env.run(until=ev)
        self._pending.popleft()
        return ev.value

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._pending.clear()

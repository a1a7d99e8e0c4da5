"""One simulated serving run: the production engine core on virtual RNGD cards, in simulated time.

Each data-parallel replica is an ``EngineCore`` (the real ``Scheduler`` and ``BlockAllocator``)
over a ``SimQueue``, driven by a SimPy process that does what ``LLMEngine.step`` does: fill the
queue, wait for the oldest batch, fold its result in, then spend the host time. New requests
go to the replica with the fewest live requests.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import simpy

from furiosa_llm.core import EngineCore, JitConfig, JitPolicy, Request, Scheduler, SchedulerConfig
from furiosa_llm.hal import BatchExecutor, parse_devices
from furiosa_llm.hal.cost_model import CostModel, ModelShape, load_model_shape, load_profile, rngd_cost_model
from furiosa_llm.hal.simulator import ReplicaPlacement, SimQueue, SyntheticTokens, place_replicas

from .metrics import SLO, MetricsRecorder
from .workload import Workload

KV_SAMPLES = 2000  # points of the KV-usage timeline kept in a report


@dataclass
class SimConfig:
    """The engine's knobs plus what the simulator needs: a model shape, a cost profile, the parallel sizes."""

    model: ModelShape | str = "llama-3.1-8b"
    devices: str = "npu:0"
    tensor_parallel_size: int = 8
    pipeline_parallel_size: int = 1
    data_parallel_size: int | None = None
    npu_queue_limit: int = 1
    max_processing_samples: int = 65536
    spare_blocks_ratio: float = 0.0
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # per replica; default: what the device memory holds
    profile: str | CostModel = "rngd"  # "rngd" or a calibrated profile (path or CostModel)
    compute_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    kv_memory_utilization: float = 0.9
    enable_jit_compilation: bool = False
    jit_threshold: int = 5
    jit_max_workers: int = 15
    jit_unit_size: int = 8
    jit_compile_s_per_unit: float = 20.0  # rngd profile: assumed
    jit_slow_factor: float = 2.0  # rngd profile: assumed

    def __post_init__(self) -> None:
        if isinstance(self.profile, str) and self.profile != "rngd":
            cost, shape = load_profile(self.profile)
            self.profile = cost
            if shape is not None and self.model in (None, "profile", shape.name):
                self.model = shape  # the model the profile was measured on
        if isinstance(self.model, str):
            self.model = load_model_shape(self.model)
        if not 0 < self.kv_memory_utilization <= 1:
            raise ValueError(f"kv_memory_utilization={self.kv_memory_utilization!r}: must be in (0, 1]")
        SchedulerConfig(num_blocks=1, block_size=self.block_size, max_num_batched_tokens=self.max_num_batched_tokens,
                        max_processing_samples=self.max_processing_samples, spare_blocks_ratio=self.spare_blocks_ratio)
        self.jit_config()  # validates the JIT knobs

    def jit_config(self) -> JitConfig:
        return JitConfig(self.enable_jit_compilation, self.jit_threshold, self.jit_max_workers, self.jit_unit_size)

    @classmethod
    def from_engine_args(cls, args, **sim) -> "SimConfig":
        """The engine's own flags (an ``EngineArgs``) plus simulator settings."""
        sim.setdefault("model", args.model)
        return cls(
            devices=args.devices or "npu:0",
            pipeline_parallel_size=args.pipeline_parallel_size or 1,
            data_parallel_size=args.data_parallel_size,
            npu_queue_limit=args.resolved_npu_queue_limit,
            max_processing_samples=args.resolved_max_processing_samples,
            spare_blocks_ratio=args.resolved_spare_blocks_ratio,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size,
            max_model_len=args.max_model_len,
            enable_prefix_caching=args.enable_prefix_caching,
            num_kv_blocks=args.num_kv_blocks,
            enable_jit_compilation=args.enable_jit_compilation,
            jit_threshold=args.jit_threshold,
            jit_max_workers=args.jit_max_workers,
            jit_unit_size=args.jit_unit_size,
            **sim,
        )

    def describe(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.name
        d["profile"] = self.profile if isinstance(self.profile, str) else self.profile.name
        return d

    # ---- derived ---------------------------------------------------------------------------
    def placements(self) -> list[ReplicaPlacement]:
        devices = parse_devices(self.devices)
        if all(d.kind != "npu" for d in devices):  # a calibrated torch profile: one replica per device
            if isinstance(self.profile, str):
                raise ValueError(f"devices={self.devices!r}: the rngd profile models npu devices; "
                                 "cpu/cuda need a profile from 'furiosa-llm calibrate'")
            return [ReplicaPlacement(((d,),)) for d in devices]
        return place_replicas(devices, self.tensor_parallel_size, self.pipeline_parallel_size,
                              self.data_parallel_size)

    def stage_cost(self) -> CostModel:
        if isinstance(self.profile, CostModel):
            return self.profile
        return rngd_cost_model(self.tensor_parallel_size, compute_efficiency=self.compute_efficiency,
                               bandwidth_efficiency=self.bandwidth_efficiency, model=self.model,
                               jit_compile_s_per_unit=self.jit_compile_s_per_unit, jit_slow_factor=self.jit_slow_factor)

    def kv_blocks(self, cost: CostModel) -> int:
        """KV blocks of one replica: what is left of each stage's memory after its share of the weights."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        if cost.memory_bytes is None:
            blocks = cost.notes.get("num_kv_blocks")
            if blocks is None:
                raise ValueError(f"num_kv_blocks=None: profile {cost.name!r} does not model memory; pass --num-kv-blocks")
            return int(blocks)
        pp = self.pipeline_parallel_size
        weights = self.model.weight_bytes(cost.dtype_bytes) / pp
        free = cost.memory_bytes * self.kv_memory_utilization - weights
        per_block = self.model.kv_bytes_per_token(cost.dtype_bytes) / pp * self.block_size
        blocks = int(free // per_block)
        if blocks < 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size}, pipeline_parallel_size={pp}: {self.model.name} needs "
                f"{weights / 1e9:.1f} GB of weights per stage but a stage has {cost.memory_bytes / 1e9:.1f} GB; "
                "use more PEs per stage or more pipeline stages"
            )
        return blocks

    def scheduler_config(self, num_blocks: int) -> SchedulerConfig:
        model_len = min(self.max_model_len or self.model.max_position_embeddings, num_blocks * self.block_size)
        return SchedulerConfig(
            num_blocks=num_blocks, block_size=self.block_size, max_num_batched_tokens=self.max_num_batched_tokens,
            max_processing_samples=self.max_processing_samples, spare_blocks_ratio=self.spare_blocks_ratio,
            max_model_len=model_len, enable_prefix_caching=self.enable_prefix_caching,
        )


class _Replica:
    def __init__(self, env: simpy.Environment, placement: ReplicaPlacement, sched_cfg: SchedulerConfig,
                 queue: SimQueue, metrics: MetricsRecorder, on_finish, record_trace: bool,
                 jit: JitPolicy | None = None) -> None:
        self.env = env
        self.placement = placement
        self.queue = queue
        self.core = EngineCore(Scheduler(sched_cfg, frozenset(), record_trace=record_trace), queue, lambda: env.now,
                               jit=jit)
        self.metrics = metrics
        self.on_finish = on_finish
        self.kv_t = []
        self.kv_used = []
        self._wake = None
        env.process(self._serve())

    @property
    def load(self) -> int:
        return len(self.core.scheduler.requests)

    def add(self, req: Request) -> None:
        self.core.add_request(req)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _serve(self):
        env, core, q, metrics = self.env, self.core, self.queue, self.metrics
        alloc = core.allocator
        while True:
            core.submit()
            if not q.in_flight:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            yield q.oldest()
            result = q.wait()
            outputs = core.process(result)
            host = q.last_host_s  # scheduling, sampling and detokenizing: outputs reach users after it
            if host > 0:
                yield env.timeout(host)
            now = env.now
            done = metrics.on_outputs(outputs, now)
            if done:
                self.on_finish(done)
            self.kv_t.append(now)
            self.kv_used.append(alloc.num_used)


@dataclass
class SimResult:
    report: dict
    per_request: dict[str, np.ndarray] = field(repr=False)
    kv_usage: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (time, used fraction over all replicas)
    traces: list = field(default_factory=list, repr=False)  # per replica, when record_trace
    wall_s: float = 0.0


DISPATCH = ("least_loaded", "round_robin")
PROMPT_POOL = 1 << 20  # synthetic prompts are random windows of one seeded pool of token ids


@dataclass
class _Part:
    """What simulating some of the replicas gives back (picklable, for worker processes)."""

    metrics: MetricsRecorder
    duration: float
    replicas: dict[int, dict]
    kv: dict[int, tuple[list, list]]
    traces: dict[int, list]


def _run_part(config: SimConfig, workload: Workload, replica_ids: list[int], dispatch: str,
              tokens: BatchExecutor | None, record_trace: bool, progress: bool) -> _Part:
    env = simpy.Environment()
    cost = config.stage_cost()
    placements = config.placements()
    num_blocks = config.kv_blocks(cost)
    sched_cfg = config.scheduler_config(num_blocks)
    tokens = tokens or SyntheticTokens()
    metrics = MetricsRecorder()
    arrivals = workload.generate()
    n, num_replicas = len(arrivals), len(placements)
    rng = np.random.default_rng(workload.seed + 1)
    max_in = int(arrivals.input_lens.max())
    pool = rng.integers(2, config.model.vocab_size, size=max(PROMPT_POOL, 2 * max_in)).tolist()
    offsets = rng.integers(0, len(pool) - max_in, size=n).tolist()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="req", desc="simulating", mininterval=0.5)

    def on_finish(k: int = 1) -> None:
        if bar is not None:
            bar.update(k)

    jit_on = config.enable_jit_compilation
    replicas = {
        i: _Replica(env, placements[i], sched_cfg,
                    SimQueue(env, config.model, cost, tokens, limit=config.npu_queue_limit,
                             num_stages=len(placements[i].stages), jit=jit_on),
                    metrics, on_finish, record_trace,
                    JitPolicy(config.jit_config(), config.model.num_layers) if jit_on else None)
        for i in replica_ids
    }
    local = list(replicas.values())

    def arrive():
        times, ins, outs = arrivals.arrived_at.tolist(), arrivals.input_lens.tolist(), arrivals.output_lens.tolist()
        for i in range(n):
            if dispatch == "round_robin" and i % num_replicas not in replicas:
                continue
            delay = times[i] - env.now
            if delay > 0:
                yield env.timeout(delay)
            n_in, n_out = ins[i], outs[i]
            if n_in + n_out > sched_cfg.max_model_len:
                metrics.num_rejected += 1
                on_finish()
                continue
            rid = f"r{i}"
            off = offsets[i]
            req = Request(rid, pool[off : off + n_in], max_tokens=n_out, arrival_time=env.now, ignore_eos=True)
            metrics.on_arrival(rid, env.now, n_in, index=i)
            target = replicas[i % num_replicas] if dispatch == "round_robin" else min(local, key=lambda r: r.load)
            target.add(req)

    env.process(arrive())
    env.run()
    if bar is not None:
        bar.close()
    info = {}
    for i, r in replicas.items():
        st = r.core.scheduler.stats
        info[i] = {"devices": str(r.placement), "num_kv_blocks": num_blocks, "num_steps": st.num_steps,
                   "num_preemptions": st.num_preemptions, "num_cached_tokens": st.num_cached_tokens,
                   "device_busy_s": r.queue.busy_s}
        if r.core.jit is not None:
            info[i]["jit"] = r.core.jit.stats.as_dict()
    return _Part(metrics, env.now, info, {i: (r.kv_t, r.kv_used) for i, r in replicas.items()},
                 {i: r.core.scheduler.stats.trace for i, r in replicas.items()} if record_trace else {})


def simulate(config: SimConfig, workload: Workload, *, slo: SLO | None = None, tokens: BatchExecutor | None = None,
             progress: bool = False, record_trace: bool = False, dispatch: str = "least_loaded",
             workers: int = 1) -> SimResult:
    """Serve ``workload`` on the simulated devices of ``config``; deterministic for a given seed.

    ``dispatch`` sends a new request to the replica with the fewest live requests
    (``least_loaded``) or to replica ``i % replicas`` (``round_robin``). Round-robin replicas
    are independent, so ``workers`` > 1 simulates them in that many processes, with the same
    report as one process.
    """
    t0 = time.perf_counter()
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch={dispatch!r}: must be one of {', '.join(DISPATCH)}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: must be an int >= 1")
    num_replicas = len(config.placements())
    if tokens is not None and num_replicas > 1:
        raise ValueError(f"tokens: a model token source holds the KV cache of one replica; these devices make "
                         f"{num_replicas} replicas (pass one device, or data_parallel_size=1)")
    workers = min(workers, num_replicas)
    if workers > 1 and (dispatch != "round_robin" or tokens is not None or record_trace):
        raise ValueError(f"workers={workers}: parallel simulation needs dispatch='round_robin', synthetic tokens and "
                         "no decision trace")
    if workers == 1:
        parts = [_run_part(config, workload, list(range(num_replicas)), dispatch, tokens, record_trace, progress)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        groups = [list(range(num_replicas))[w::workers] for w in range(workers)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_run_part, [config] * workers, [workload] * workers, groups,
                                  [dispatch] * workers, [None] * workers, [False] * workers, [False] * workers))
    metrics = MetricsRecorder.merge([p.metrics for p in parts])
    duration = max(p.duration for p in parts)
    info = {i: d for p in parts for i, d in p.replicas.items()}
    kv = {i: d for p in parts for i, d in p.kv.items()}
    traces = {i: d for p in parts for i, d in p.traces.items()}
    summary = metrics.summary(duration, slo)
    for key in ("num_preemptions", "num_steps", "num_cached_tokens"):
        summary[key] = sum(info[i][key] for i in sorted(info))
    if config.enable_jit_compilation:
        jits = [info[i]["jit"] for i in sorted(info)]
        compiled, slow = sum(j["steps_compiled"] for j in jits), sum(j["steps_slow"] for j in jits)
        ready = [j["first_ready_at"] for j in jits if j["first_ready_at"] is not None]
        summary["jit"] = {
            "hit_rate": compiled / (compiled + slow) if compiled + slow else 0.0,
            "compilations_started": sum(j["compilations_started"] for j in jits),
            "compilations_finished": sum(j["compilations_finished"] for j in jits),
            "compilations_failed": sum(j["compilations_failed"] for j in jits),
            "compile_seconds_total": sum(j["compile_seconds_total"] for j in jits),
            "first_bucket_ready_s": min(ready) if ready else None,
        }

    # KV usage over all replicas: each replica's latest sample carried forward
    ids = sorted(kv)
    num_blocks = info[ids[0]]["num_kv_blocks"]
    t_all = np.concatenate([np.asarray(kv[i][0], dtype=float) for i in ids])
    vals = np.concatenate([np.asarray(kv[i][1], dtype=float) for i in ids])
    owner = np.concatenate([np.full(len(kv[i][0]), j) for j, i in enumerate(ids)]).astype(int)
    order = np.argsort(t_all, kind="stable")
    delta = np.zeros(len(t_all))
    last = np.zeros(len(ids))
    for k in order.tolist():
        delta[k] = vals[k] - last[owner[k]]
        last[owner[k]] = vals[k]
    kv_time, kv_frac = t_all[order], np.cumsum(delta[order]) / (num_blocks * len(ids))
    summary["mean_kv_usage"] = float(kv_frac.mean()) if len(kv_frac) else 0.0
    summary["max_kv_usage"] = float(kv_frac.max()) if len(kv_frac) else 0.0
    keep = np.unique(np.linspace(0, len(kv_time) - 1, min(KV_SAMPLES, len(kv_time))).astype(int)) if len(kv_time) else []
    report = {
        "config": config.describe(),
        "workload": workload.describe(),
        "slo": None if slo is None else asdict(slo),
        "dispatch": dispatch,
        "replicas": [
            {**{k: v for k, v in info[i].items() if k != "num_cached_tokens"},
             "utilization": info[i]["device_busy_s"] / duration if duration else 0.0}
            for i in ids
        ],
        "max_model_len": config.scheduler_config(num_blocks).max_model_len,
        "metrics": summary,
        "kv_usage": {"time_s": [float(kv_time[i]) for i in keep], "used_fraction": [float(kv_frac[i]) for i in keep]},
    }
    return SimResult(report, metrics.per_request(), (kv_time, kv_frac), [traces[i] for i in ids] if traces else [],
                     time.perf_counter() - t0)


def jsonable(obj):
    """Report values as strict JSON (NaN and infinities become null)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


"""What to simulate: ``SimConfig`` (the engine's arguments plus the simulator's own settings) and ``SimPlan``.

``SimConfig`` holds an ``EngineArgs`` (every engine knob, the same object the real engine
takes) and only what the simulator adds: the model's shape, the tensor-parallel size, the cost
profile and its assumptions. ``SimConfig.plan()`` resolves it once into a ``SimPlan``: where
each replica runs, what a step costs on one stage, and the core's ``EngineConfig``, which comes
from ``EngineArgs.engine_config`` like the real engine's.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from furiosa_llm.api.engine_args import EngineArgs
from furiosa_llm.core.config import EngineConfig
from furiosa_llm.hal import parse_devices
from furiosa_llm.hal.cost_model import LINK_LATENCY_S, CostModel, ModelShape, load_model_shape, load_profile, rngd_cost_model
from furiosa_llm.hal.devices import PES_PER_CARD
from furiosa_llm.hal.simulator import ReplicaPlacement, place_replicas, unused_devices

DEFAULT_MODEL = "llama-3.1-8b"
MAX_KV_BLOCKS = 1 << 21  # KV blocks of one simulated replica: the allocator keeps a Python object for each
DEFAULT_DEVICES = "npu:0"  # the simulator's default: one card (the real engine's is "whatever is installed")
ENGINE_ARG_NAMES = frozenset(f.name for f in dataclasses.fields(EngineArgs))
# the rngd profile's assumptions (SimConfig fields): a calibrated profile has its own figures instead
RNGD_ASSUMPTIONS = ("compute_efficiency", "bandwidth_efficiency", "jit_compile_s_per_unit", "jit_slow_factor",
                    "link_latency_s", "step_overhead_s", "host_overhead_s", "host_s_per_seq")
# engine arguments of serving that the simulator has no use for, with the values that ask for nothing: any other
# value is refused, not ignored (the model token source reads the revision itself)
UNUSED_ENGINE_ARGS = {"revision": (None,), "tokenizer": (None,), "tokenizer_mode": ("auto",), "enforce_eager": (False,),
                      "max_logprobs": (20,), "fxb": (None,), "task": ("auto", "generate"), "convert": ("auto", "none"),
                      "pooling_type": (None,), "structured_outputs_backend": ("auto",)}
# the engine arguments the simulator honours, in the order reports list them
ENGINE_KNOBS = ("devices", "pipeline_parallel_size", "data_parallel_size", "npu_queue_limit", "max_processing_samples",
                "spare_blocks_ratio", "max_num_batched_tokens", "block_size", "max_model_len", "enable_prefix_caching",
                "num_kv_blocks", "enable_jit_compilation", "jit_threshold", "jit_max_workers", "jit_unit_size")


@dataclass(init=False)
class SimConfig:
    """The engine's arguments (``engine_args``) plus what only the simulator needs.

    Build it with keywords: engine arguments by their ``EngineArgs`` names, the simulator's by
    the field names below, e.g. ``SimConfig(model="llama-3.1-8b", devices="npu:0,npu:1",
    npu_queue_limit=2, tensor_parallel_size=8)``; or from an ``EngineArgs`` with
    ``SimConfig(engine_args=args, ...)`` (``from_engine_args``). ``dataclasses.replace(config,
    devices=...)`` takes both kinds too. ``model`` is a shipped config name, a ``config.json``
    (or a folder holding one) or a ``ModelShape``; by default the engine's ``model``. ``profile``
    is ``"rngd"`` (RNGD's public specifications) or a profile written by ``furiosa-llm calibrate``
    (a path or a ``CostModel``); a profile that names its model supplies the shape.
    """

    engine_args: EngineArgs
    model: ModelShape
    tensor_parallel_size: int = 8  # PEs per pipeline stage
    profile: str | CostModel = "rngd"
    compute_efficiency: float = 0.6  # rngd profile: achieved share of peak FLOPs (assumed)
    bandwidth_efficiency: float = 0.8  # rngd profile: achieved share of HBM bandwidth (assumed)
    kv_memory_utilization: float = 0.9  # share of a stage's memory for weights + KV cache
    jit_compile_s_per_unit: float = 20.0  # rngd profile, JIT on: seconds per compile unit (assumed)
    jit_slow_factor: float = 2.0  # rngd profile, JIT on: slowdown of an uncompiled decode step (assumed)
    quantization: str = "none"  # rngd profile: none (BF16), fp8 (W8A8) or w8a16
    kv_cache_dtype: str = "auto"  # rngd profile: auto (BF16), bf16 or fp8
    link_latency_s: float = LINK_LATENCY_S  # rngd profile: one message between cards over PCIe (assumed)
    step_overhead_s: float = 0.5e-3  # rngd profile: fixed device seconds per step (launch, sync; assumed)
    host_overhead_s: float = 0.2e-3  # rngd profile: host seconds per step (scheduling, sampling; assumed)
    host_s_per_seq: float = 2e-6  # rngd profile: host seconds per sequence of a step (assumed)

    def __init__(self, model: ModelShape | str | None = None, *, engine_args: EngineArgs | None = None,
                 **knobs: Any) -> None:
        if engine_args is not None and not isinstance(engine_args, EngineArgs):
            raise ValueError(f"engine_args={engine_args!r}: must be an EngineArgs (or pass its fields as keywords)")
        sim_fields = dataclasses.fields(SimConfig)[2:]
        for f in sim_fields:
            setattr(self, f.name, knobs.pop(f.name, f.default))
        unknown = sorted(set(knobs) - ENGINE_ARG_NAMES)
        if unknown:
            raise TypeError(f"SimConfig: unknown argument(s) {', '.join(unknown)}; simulator settings are "
                            f"{', '.join(f.name for f in sim_fields)}, engine arguments those of EngineArgs")
        # types here (numpy's numbers too); the values are checked where they are used
        tp = self.tensor_parallel_size
        if isinstance(tp, (bool, np.bool_)) or not isinstance(tp, numbers.Integral):
            raise ValueError(f"tensor_parallel_size={tp!r}: must be an int (PEs per pipeline stage)")
        self.tensor_parallel_size = int(tp)
        if not isinstance(self.profile, (str, CostModel)):
            raise ValueError(f"profile={self.profile!r}: must be 'rngd', a path to a calibrated profile or a CostModel")
        for f in sim_fields:
            v = getattr(self, f.name)
            if isinstance(f.default, float):
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
                    raise ValueError(f"{f.name}={v!r}: must be a number")
                setattr(self, f.name, float(v))
        profile_shape = None
        if isinstance(self.profile, str) and self.profile != "rngd":
            self.profile, profile_shape = load_profile(self.profile)
        if model is None:
            model = engine_args.model if engine_args is not None else (profile_shape or DEFAULT_MODEL)
        if profile_shape is not None and model in ("profile", profile_shape.name):
            model = profile_shape  # the model the profile was measured on
        self._profile_model = profile_shape
        self.model = model if isinstance(model, ModelShape) else load_model_shape(model)
        if engine_args is None:
            engine_args = EngineArgs(model=self.model.name, **knobs)
        elif knobs:
            engine_args = dataclasses.replace(engine_args, **knobs)
        self.engine_args = engine_args
        ignored = [f"{k}={getattr(engine_args, k)!r}" for k, fine in UNUSED_ENGINE_ARGS.items()
                   if getattr(engine_args, k) not in fine]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: engine arguments of serving that the simulator does not use (its "
                             "requests come from the workload: embedding ones with embed_fraction, --embed-fraction)")
        for k in ("step_overhead_s", "host_overhead_s", "host_s_per_seq", "link_latency_s"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < math.inf:
                raise ValueError(f"{k}={v!r}: must be a finite number >= 0 (seconds)")
        if self.quantization is None:  # as EngineArgs: vLLM's spelling of no quantization
            self.quantization = "none"
        if self.quantization == "none" and engine_args.quantization != "none":
            self.quantization = engine_args.quantization  # the engine's --quantization, when not set here
        if not 0 < self.kv_memory_utilization <= 1:
            raise ValueError(f"kv_memory_utilization={self.kv_memory_utilization!r}: must be in (0, 1]")
        if self.profile == "rngd" and engine_args.dtype not in ("auto", "bfloat16"):
            raise ValueError(f"dtype={engine_args.dtype!r}: the rngd profile serves BF16 activations; choose the "
                             "weight format with --quantization none|fp8|w8a16 and the KV cache's with --kv-cache-dtype")

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **sim: Any) -> "SimConfig":
        """The engine's own arguments (an ``EngineArgs``) plus simulator settings."""
        return cls(engine_args=args, **sim)

    # ---- resolved engine knobs -----------------------------------------------------------------
    @property
    def devices(self) -> str:
        return self.engine_args.devices or DEFAULT_DEVICES

    @property
    def pipeline_parallel_size(self) -> int:
        return self.engine_args.pipeline_parallel_size or 1

    def describe(self) -> dict:
        """Every knob of the run (engine arguments resolved to the values used), for reports."""
        e = self.engine_args
        d = {"model": self.model.name, **{k: getattr(e, k) for k in ENGINE_KNOBS}}
        d.update(devices=self.devices, pipeline_parallel_size=self.pipeline_parallel_size,
                 npu_queue_limit=e.resolved_npu_queue_limit, max_processing_samples=e.resolved_max_processing_samples,
                 spare_blocks_ratio=e.resolved_spare_blocks_ratio)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)[2:]})
        d["profile"] = self.profile if isinstance(self.profile, str) else self.profile.name
        return d

    # ---- the plan --------------------------------------------------------------------------------
    def plan(self) -> "SimPlan":
        """Resolve the configuration once; a ``ValueError`` names what cannot run (PEs short, model too big)."""
        if self.pipeline_parallel_size > self.model.num_layers:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size}: {self.model.name} has "
                             f"{self.model.num_layers} layers, at most one stage per layer")
        placements = self._placements()
        cost = self._stage_cost()
        num_blocks = self.engine_args.num_kv_blocks
        if num_blocks is None:
            num_blocks = self._kv_blocks_in_memory(cost)
        elif cost.memory_bytes is not None and num_blocks > (fits := self._kv_blocks_in_memory(cost, budget=False)):
            raise ValueError(f"num_kv_blocks={num_blocks}: a replica's memory holds at most {fits} KV blocks of "
                             f"{self.engine_args.block_size} tokens of {self.model.name} beside its weights")
        if num_blocks > MAX_KV_BLOCKS:  # one object per block: far more would exhaust the host's memory
            where = (f"num_kv_blocks={num_blocks}" if self.engine_args.num_kv_blocks is not None else
                     f"profile {cost.name!r} (memory_bytes={cost.memory_bytes!r}) gives {num_blocks} KV blocks, which is")
            raise ValueError(f"{where} more than the simulator holds per replica ({MAX_KV_BLOCKS:,}: it keeps an "
                             "object per block)")
        engine_config = self.engine_args.engine_config(num_blocks=num_blocks,
                                                       model_max_len=self.model.max_position_embeddings)
        return SimPlan(self.model, tuple(placements), cost, engine_config,
                       unused_devices(parse_devices(self.devices), placements))

    def _placements(self) -> list[ReplicaPlacement]:
        devices = parse_devices(self.devices)
        if all(d.kind != "npu" for d in devices):  # a calibrated torch profile: one replica per device
            if isinstance(self.profile, str):
                raise ValueError(f"devices={self.devices!r}: the rngd profile models npu devices; "
                                 "cpu/cuda need a profile from 'furiosa-llm calibrate'")
            if self._profile_pes() is not None:
                raise ValueError(f"devices={self.devices!r}: profile {self.profile.name!r} was timed on "
                                 f"{self.profile.notes['devices']} (a card); it predicts npu devices only")
            if self.pipeline_parallel_size > 1 or self.tensor_parallel_size != PES_PER_CARD:
                raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size}, tensor_parallel_size="
                                 f"{self.tensor_parallel_size}: devices {self.devices!r} run one calibrated stage per "
                                 "replica (the layouts of PEs and stages are for npu devices)")
            dp = self.engine_args.data_parallel_size or 1
            if dp > 1 and [d.kind for d in devices] == ["cpu"]:  # a CPU split: dp replicas, each as calibrated
                return [ReplicaPlacement(((devices[0],),))] * dp
            return [ReplicaPlacement(((d,),)) for d in devices]
        measured_on = self.profile.notes.get("device") if isinstance(self.profile, CostModel) else None
        if measured_on is not None and not str(measured_on).startswith("npu"):
            raise ValueError(f"devices={self.devices!r}: profile {self.profile.name!r} was calibrated on {measured_on} "
                             "(the torch backend); npu devices need the rngd profile or a profile calibrated on a card "
                             "('furiosa-llm calibrate --devices npu:N')")
        measured_pes = self._profile_pes()
        if measured_pes is not None and (self.tensor_parallel_size, self.pipeline_parallel_size) != (measured_pes, 1):
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size}, pipeline_parallel_size="
                             f"{self.pipeline_parallel_size}: profile {self.profile.name!r} timed the whole model on "
                             f"{self.profile.notes['devices']} ({measured_pes} PEs, one stage), so it predicts replicas of "
                             f"that layout only: pass --tensor-parallel-size {measured_pes} without -pp, or calibrate "
                             "the layout you want to plan")
        return place_replicas(devices, self.tensor_parallel_size, self.pipeline_parallel_size,
                              self.engine_args.data_parallel_size)

    def _profile_pes(self) -> int | None:
        """PEs of the replica a card-calibrated profile was measured on (its notes' ``devices``); None for other profiles."""
        if not isinstance(self.profile, CostModel):
            return None
        if "devices" not in self.profile.notes:
            return None
        devices = self.profile.notes["devices"]
        try:
            parsed = parse_devices(devices)
        except ValueError as e:
            raise ValueError(f"profile {self.profile.name!r}: notes.devices={devices!r} is not a device list: {e}") from None
        if any(d.kind != "npu" for d in parsed):
            raise ValueError(f"profile {self.profile.name!r}: notes.devices={devices!r}: the card profile's devices "
                             "must be npu devices")
        return sum(d.num_pes for d in parsed)

    def _stage_cost(self) -> CostModel:
        defaults = {f.name: f.default for f in dataclasses.fields(SimConfig)}
        if not self.engine_args.enable_jit_compilation:  # the JIT figures and settings would be silently ignored
            engine_defaults = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
            jit = [f"{k}={getattr(self, k)!r}" for k in ("jit_compile_s_per_unit", "jit_slow_factor")
                   if getattr(self, k) != defaults[k]]
            jit += [f"{k}={getattr(self.engine_args, k)!r}" for k in ("jit_threshold", "jit_max_workers", "jit_unit_size")
                    if getattr(self.engine_args, k) != engine_defaults[k]]
            if jit:
                raise ValueError(f"{', '.join(jit)}: figures of JIT compilation, which is off; enable it "
                                 "(enable_jit_compilation=True, --enable-jit-compilation) or leave them unset")
        if isinstance(self.profile, CostModel):
            if (self.quantization, self.kv_cache_dtype) != ("none", "auto"):
                raise ValueError(f"quantization={self.quantization!r}, kv_cache_dtype={self.kv_cache_dtype!r}: number "
                                 f"formats apply to the rngd profile; profile {self.profile.name!r} measured what it ran")
            # the rngd profile's assumptions would be silently ignored: a calibrated profile has its own figures
            ignored = [f"{k}={getattr(self, k)!r}" for k in RNGD_ASSUMPTIONS if getattr(self, k) != defaults[k]]
            if self.profile.memory_bytes is None and self.kv_memory_utilization != defaults["kv_memory_utilization"]:
                ignored.append(f"kv_memory_utilization={self.kv_memory_utilization!r}")  # blocks come from the profile
            if ignored:
                raise ValueError(f"{', '.join(ignored)}: assumptions of the rngd profile; profile {self.profile.name!r} "
                                 "has its own figures (edit the profile to change them)")
            return self.profile
        return rngd_cost_model(self.tensor_parallel_size, compute_efficiency=self.compute_efficiency,
                               bandwidth_efficiency=self.bandwidth_efficiency, model=self.model,
                               jit_compile_s_per_unit=self.jit_compile_s_per_unit, jit_slow_factor=self.jit_slow_factor,
                               quantization=self.quantization, kv_cache_dtype=self.kv_cache_dtype,
                               link_latency_s=self.link_latency_s, overhead_s=self.step_overhead_s,
                               host_overhead_s=self.host_overhead_s, host_s_per_seq=self.host_s_per_seq)

    def _kv_blocks_in_memory(self, cost: CostModel, budget: bool = True) -> int:
        """KV blocks of one replica: what is left of each stage's memory after its share of the weights, within
        ``kv_cache_memory_bytes`` when set (``budget``; ``num_kv_blocks`` overrides it)."""
        if cost.memory_bytes is None:
            blocks = cost.notes.get("num_kv_blocks")
            if blocks is None:
                raise ValueError(f"num_kv_blocks=None: profile {cost.name!r} does not model memory; pass --num-kv-blocks")
            measured_bs = cost.notes.get("block_size", self.engine_args.block_size)
            for k, v in (("num_kv_blocks", blocks), ("block_size", measured_bs)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"profile {cost.name!r}: notes.{k}={v!r}: must be an int >= 1")
            if self.engine_args.kv_cache_memory_bytes is not None:
                raise ValueError(f"kv_cache_memory_bytes={self.engine_args.kv_cache_memory_bytes}: profile {cost.name!r} "
                                 f"does not model memory (it counted {blocks} KV blocks); pass --num-kv-blocks instead")
            measured = self._profile_model
            if measured is not None and (measured.num_layers, measured.num_kv_heads, measured.head_dim) != (
                    self.model.num_layers, self.model.num_kv_heads, self.model.head_dim):
                raise ValueError(f"num_kv_blocks=None: profile {cost.name!r} counted {blocks} KV blocks of "
                                 f"{measured.name}, whose blocks differ from {self.model.name}'s; pass --num-kv-blocks")
            # the same KV memory in blocks of this run's size: the tokens it holds stay the same
            converted = blocks * measured_bs // self.engine_args.block_size
            if converted < 1:
                raise ValueError(f"block_size={self.engine_args.block_size}: profile {cost.name!r} counted {blocks} KV "
                                 f"blocks of {measured_bs} tokens ({blocks * measured_bs} tokens), less than one block")
            return converted
        pp = self.pipeline_parallel_size
        share = self.model.stage_share(pp)  # the largest stage holds the most layers: it sets the replica's blocks
        weights = self.model.weight_bytes(cost.dtype_bytes) * share
        usable = cost.memory_bytes * self.kv_memory_utilization
        free = usable - weights
        per_block = self.model.kv_bytes_per_token(cost.kv_bytes) * share * self.engine_args.block_size
        blocks = int(free // per_block)
        budget = self.engine_args.kv_cache_memory_bytes if budget else None  # per stage, as on a real device
        if budget is not None and budget < per_block:
            raise ValueError(f"kv_cache_memory_bytes={budget}: less than one KV block ({per_block:.0f} bytes per stage: "
                             f"{self.engine_args.block_size} tokens of {self.model.name})")
        if budget is not None and blocks >= 1:
            if budget // per_block > blocks:
                raise ValueError(f"kv_cache_memory_bytes={budget}: a stage's memory holds at most "
                                 f"{blocks * per_block:.0f} bytes of KV cache beside its share of the weights")
            blocks = int(budget // per_block)
        if blocks < 1:
            layout = f"tensor_parallel_size={self.tensor_parallel_size}, pipeline_parallel_size={pp}"
            usable_msg = (f"{usable / 1e9:.1f} GB for weights and KV cache (kv_memory_utilization="
                          f"{self.kv_memory_utilization} of {cost.memory_bytes / 1e9:.1f} GB)")
            if free <= 0:
                raise ValueError(f"{layout}: {self.model.name} needs {weights / 1e9:.1f} GB of weights per stage but a "
                                 f"stage has {usable_msg}; use more PEs per stage or more pipeline stages")
            raise ValueError(f"{layout}: a stage has {usable_msg}; beside {weights / 1e9:.1f} GB of weights that leaves "
                             f"{free:.0f} bytes, less than one KV block ({per_block:.0f} bytes); raise "
                             "kv_memory_utilization or use more PEs per stage")
        return blocks


@dataclass(frozen=True, slots=True)
class SimPlan:
    """A ``SimConfig`` resolved: the model, each replica's PEs, one stage's step cost, the core's configuration.

    Every replica runs ``engine_config`` (the same ``EngineConfig`` the real engine would derive from
    the arguments, with this many KV blocks); a step's device time on each pipeline stage is the cost
    model's time for the whole model times the largest stage's share of the layers.
    """

    model: ModelShape
    placements: tuple[ReplicaPlacement, ...]
    cost: CostModel
    engine_config: EngineConfig
    unused_devices: str = ""  # devices, or PEs of a card, given but in no replica (the layout leaves them over)

    @property
    def num_replicas(self) -> int:
        return len(self.placements)

    @property
    def num_kv_blocks(self) -> int:
        """KV blocks of one replica."""
        return self.engine_config.scheduler_config.num_blocks

    @property
    def max_model_len(self) -> int:
        return self.engine_config.scheduler_config.max_model_len

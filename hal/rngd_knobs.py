"""Our knobs -> the vendor engine's configuration: THE one table, for ``furiosa-llm-native`` 2026.4.

``NativeLLMEngine`` (``furiosa.llm_native.llm``) takes constructor arguments and a scheduler JSON
(serde: required keys ``npu_queue_limit``, ``max_processing_samples``,
``prefix_cache_config{enabled, lookahead_requests}``, ``experimental_aggressive_batching``,
``data_parallel_routing_policy`` (``round-robin``|``scoring``), ``data_parallel_scoring_profile``
(``balanced``|``locality``|``load``; null is refused), ``enable_npu_sampling``; unknown keys are
ignored silently) plus a logger JSON (``{"log_stats": bool}``). Every ``EngineArgs`` field has one
row in ``ENGINE_KNOBS``: where it goes (a constructor argument, a scheduler-JSON path, our side of
the seam) or why it is refused. A refused knob set away from its default is a ``ValueError`` naming
it and the native version, never a dropped value. ``SAMPLING_KNOBS`` does the same per request.
Facts checked against the real 2026.4.0 parser (``tests/test_rngd.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

NATIVE_VERSION = "2026.4.0"  # the furiosa-llm-native release this table was checked against


@dataclass(frozen=True, slots=True)
class Knob:
    """One ``EngineArgs`` field: ``to`` is ``ctor:<argument>``, ``sched:<json path>``, ``ours`` or ``refused``.

    ``convert`` turns our value into the native one; ``default`` is the value a refused knob may keep.
    """

    name: str
    to: str
    convert: Callable[[Any], Any] | None = None
    default: Any = None
    why: str = ""
    allowed: Callable[[Any], bool] | None = None  # a mapped knob that accepts only some values


def _only_one(v: Any) -> int:
    return 1 if v is None else v


ENGINE_KNOBS: tuple[Knob, ...] = (
    Knob("model", "ctor:model_path", str),
    Knob("devices", "ctor:devices"),  # resolved by discovery first: an explicit list of PEs
    Knob("data_parallel_size", "ctor:data_parallel_size"),
    Knob("pipeline_parallel_size", "ctor:pipeline_parallel_size"),
    Knob("max_model_len", "ctor:max_model_len"),
    Knob("npu_queue_limit", "sched:npu_queue_limit", _only_one, default=1, allowed=lambda v: v in (None, 1),
         why="the vendor scheduler accepts only npu_queue_limit=1 ('npu_queue_limit must be 1 for now')"),
    Knob("max_processing_samples", "sched:max_processing_samples", lambda v: 65536 if v is None else v),
    Knob("enable_prefix_caching", "sched:prefix_cache_config.enabled", bool),
    Knob("max_num_batched_tokens", "sched:max_num_batched_tokens", int),
    Knob("spare_blocks_ratio", "refused", default=None,
         why="the vendor scheduler has no spare-blocks knob (an unknown scheduler key is silently ignored)"),
    Knob("enable_jit_compilation", "refused", default=False, why="the vendor engine runs precompiled FXB buckets only"),
    Knob("jit_threshold", "refused", default=5, why="no JIT in the vendor engine"),
    Knob("jit_max_workers", "refused", default=15, why="no JIT in the vendor engine"),
    Knob("jit_unit_size", "refused", default=8, why="no JIT in the vendor engine"),
    Knob("seed", "refused", default=None, why="the vendor constructor has no seed argument"),
    Knob("block_size", "refused", default=16, why="the FXB fixes the KV block layout"),
    Knob("kv_cache_memory_bytes", "refused", default=None, why="the vendor engine sizes the KV cache on the card"),
    Knob("num_kv_blocks", "refused", default=None, why="the vendor engine sizes the KV cache on the card"),
    Knob("dtype", "refused", default="auto", why="the FXB is compiled for one dtype"),
    Knob("enforce_eager", "refused", default=False, why="the vendor engine runs its precompiled FXB buckets; there are no CUDA graphs to turn off"),
    Knob("quantization", "refused", default="none", why="the FXB is compiled with its weight format (chosen when the artifact is built)"),
    Knob("revision", "ours"),
    Knob("tokenizer", "ours"),
    Knob("tokenizer_mode", "ours"),
    Knob("cache_dir", "ours"),  # converted weights of the torch backend; the FXB cache is the vendor's default
    Knob("max_logprobs", "ours"),
    Knob("fxb", "ours"),  # an explicit FXB bundle; passed as fxb_path after artifact resolution
    Knob("structured_outputs_backend", "ours"),  # used only by requests with structured_outputs, refused on RNGD
    Knob("task", "refused", default="auto", why="this backend serves generation only on RNGD (no pooling path yet)"),
    Knob("convert", "refused", default="auto", why="this backend serves generation only on RNGD (no pooling path yet)"),
    Knob("pooling_type", "refused", default=None, why="this backend serves generation only on RNGD (no pooling path yet)"),
)

# scheduler-JSON keys we always write with these values (no EngineArgs field maps to them)
SCHEDULER_FIXED: dict[str, Any] = {
    "prefix_cache_config": {"lookahead_requests": 0},
    "experimental_aggressive_batching": False,
    "data_parallel_routing_policy": "round-robin",
    "data_parallel_scoring_profile": "balanced",
    "enable_npu_sampling": False,
}

# SamplingParams fields the vendor engine does not honour: (field, its neutral value)
SAMPLING_KNOBS: tuple[Knob, ...] = (
    Knob("seed", "refused", default=None, why="per-request seeds are not supported by the vendor sampler"),
    Knob("presence_penalty", "refused", default=0.0, why="not supported by the vendor sampler"),
    Knob("frequency_penalty", "refused", default=0.0, why="not supported by the vendor sampler"),
    Knob("structured_outputs", "refused", default=None,
         why="this project does not pass output constraints to the vendor engine (use the torch backend)"),
)


def refused_error(name: str, value: Any, why: str, default: Any) -> ValueError:
    return ValueError(f"{name}={value!r} is not supported on RNGD by furiosa-llm-native {NATIVE_VERSION}: {why}; "
                      f"leave it at {default!r}")


def _set_path(d: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


@dataclass(slots=True)
class NativeConfig:
    """The vendor constructor's keyword arguments (our names on its side) and its two JSON strings."""

    ctor: dict[str, Any]
    scheduler: dict[str, Any]
    logger: dict[str, Any]

    @property
    def scheduler_json(self) -> str:
        return json.dumps(self.scheduler)

    @property
    def logger_json(self) -> str:
        return json.dumps(self.logger)


def translate(args: Any, *, devices: str, fxb_path: str) -> NativeConfig:
    """``EngineArgs`` -> ``NativeConfig``. ``ValueError`` naming the first refused knob set away from its default.

    ``devices``: the resolved device string (``npu:X:A-B,...``); ``fxb_path``: the resolved bundle.
    """
    ctor: dict[str, Any] = {}
    sched: dict[str, Any] = json.loads(json.dumps(SCHEDULER_FIXED))
    for k in ENGINE_KNOBS:
        value = getattr(args, k.name, k.default)
        if k.to == "ours":
            continue
        if k.to == "refused":
            if value != k.default:
                raise refused_error(k.name, value, k.why, k.default)
            continue
        if k.allowed is not None and not k.allowed(value):
            raise refused_error(k.name, value, k.why, k.default)
        if k.name == "devices":
            value = devices
        native = k.convert(value) if k.convert is not None else value
        kind, _, target = k.to.partition(":")
        if kind == "ctor":
            ctor[target] = native
        else:
            _set_path(sched, target, native)
    ctor["fxb_path"] = fxb_path
    return NativeConfig(ctor=ctor, scheduler=sched, logger={"log_stats": False})


def check_sampling(params: Any) -> None:
    """``ValueError`` for a per-request knob the vendor sampler does not honour."""
    for k in SAMPLING_KNOBS:
        value = getattr(params, k.name, k.default)
        if value != k.default:
            raise refused_error(f"SamplingParams.{k.name}", value, k.why, k.default)


def open_native(factory: Callable[..., Any], cfg: NativeConfig) -> Any:
    """Call the vendor constructor (or a fake with its signature) with ``cfg``, positionally as 2026.4 orders it."""
    c = cfg.ctor
    return factory(
        c["model_path"], None, c["devices"], c.get("data_parallel_size"), c.get("pipeline_parallel_size"), None,
        cfg.scheduler_json, cfg.logger_json, "guidance", None, None, None, c["fxb_path"], None, None,
        c.get("max_model_len"),
    )

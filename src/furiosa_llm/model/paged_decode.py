"""Decode steps read K/V where they are: paged FlexAttention over the block tables, replayed as CUDA graphs.

A decode-only step of ``n`` rows is padded to the smallest capture size ``B >= n`` (vLLM's
``cudagraph_capture_sizes``; here the JIT's batch edges up to ``max_num_seqs``). Its inputs go
into static buffers, and each layer's attention is one ``flex_attention`` call over the whole
KV cache seen as ``[1, kv_heads, slots, head_dim]``, with a ``BlockMask`` whose KV blocks *are*
the cache blocks: row ``b`` visits the blocks of its block table (all but the last as full
blocks, the last through ``mask_mod``) and nothing else, so no context is gathered or copied.
On CUDA the kernel is PyTorch's Triton flex-decoding kernel (``torch.compile``, one per capture
size) and the whole step, embedding to final hidden state, is captured once per size as a CUDA
graph at start-up and replayed (``enforce_eager`` turns the graphs off, not the kernel).

``mask_mod`` must hold for every key, since eager ``flex_attention`` (the CPU, in tests)
evaluates it densely: ``physical_to_logical[b, block]`` is the index of ``block`` in row ``b``'s
block table (-1 if absent), as in PyTorch's ``torch.nn.attention.experimental._paged_attention``,
and a key is visible when its logical position is below the row's context length.
Padding rows read and write slot 0 of the runner's scratch block only.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

logger = logging.getLogger("furiosa_llm.model")


def capture_sizes(edges, max_num_seqs: int) -> list[int]:
    """The padded batch sizes: the ``edges`` below ``max_num_seqs``, and ``max_num_seqs`` itself unless above them all."""
    top = min(max_num_seqs, max(edges))
    return sorted({e for e in edges if e < top} | {top})


class PagedDecode:
    """Static inputs, block masks and (on CUDA) captured graphs of a runner's decode steps.

    ``runner``: the ``ModelRunner`` (its layers, KV views, scratch block); ``sizes``: the
    padded batch sizes; ``max_model_len``: tokens, bounding the block-table width;
    ``compile``: compile the flex kernel (CUDA; eager flex is a dense reference, for tests);
    ``graphs``: capture each size as a CUDA graph.
    """

    def __init__(self, runner, sizes: list[int], max_model_len: int, compile: bool, graphs: bool) -> None:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        r = self.runner = runner
        dev, bs = r.device, r.block_size
        self.sizes = sorted(sizes)
        bmax = self.sizes[-1]
        self.width = -(-max_model_len // bs)
        self.num_slots = (r.num_blocks + 1) * bs
        scratch = r.scratch_block
        i64 = dict(dtype=torch.long, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        # per row: token, position, KV slot, context length, full blocks, last block
        self.meta = torch.zeros(6, bmax, **i64)
        self.tokens, self.pos, self.slots = self.meta[0], self.meta[1], self.meta[2]
        self.kv_len = torch.ones(bmax, **i32)
        self.full_num = torch.zeros(bmax, **i32)
        # the last block of each row, in column 0: flex's kernel reads full and partial block lists with one
        # stride and width, so both are [rows, width]
        self.last = torch.full((bmax, self.width), scratch, **i32)
        one = torch.ones(bmax, **i32)
        self.tables = torch.full((bmax, self.width), scratch, **i64)
        self.tables32 = torch.full((bmax, self.width), scratch, **i32)
        self.cols = torch.arange(self.width, **i32).expand(bmax, -1)
        self.phys_to_log = torch.full((bmax, r.num_blocks + 1), -1, **i32)
        self.used_width = 1
        p2l, kv_len = self.phys_to_log, self.kv_len
        self.rep = r.num_heads // r.num_kv_heads

        def mask_mod(b, h, q_idx, kv_idx):
            logical = p2l[b, kv_idx // bs]
            return (logical >= 0) & (logical * bs + kv_idx % bs < kv_len[b])

        self.masks = {}
        for B in self.sizes:
            kw = dict(BLOCK_SIZE=(128, bs), mask_mod=mask_mod, seq_lengths=(self.rep, self.num_slots))
            args = (one[:B].view(B, 1, 1), self.last[:B].view(B, 1, 1, self.width),
                    self.full_num[:B].view(B, 1, 1), self.tables32[:B].view(B, 1, 1, self.width))
            try:
                self.masks[B] = BlockMask.from_kv_blocks(*args, compute_q_blocks=False, **kw)
            except TypeError:  # an older torch without compute_q_blocks
                self.masks[B] = BlockMask.from_kv_blocks(*args, **kw)
        if compile:  # one compiled kernel per size: dynamo's default limit (8) would send the rest to eager flex
            from torch import _dynamo

            cfg = _dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, 8 * len(self.sizes))
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 8 * len(self.sizes))
        self.flex = torch.compile(flex_attention, dynamic=False, fullgraph=True) if compile else flex_attention
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # padded size -> its captured step
        self.hidden: dict[int, torch.Tensor] = {}  # padded size -> its graph's output, [size, hidden]
        if compile or graphs:
            self._warm_and_capture(graphs)

    def size_for(self, n: int) -> int | None:
        """The padded batch size of ``n`` decode rows, or None when ``n`` is above the largest."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    # ---- per step ------------------------------------------------------------------------------
    def prepare(self, seqs, B: int) -> None:
        """Write the rows of ``seqs`` (one token each), padded to ``B``, into the static buffers."""
        r, bs, scratch = self.runner, self.runner.block_size, self.runner.scratch_block
        n, pad = len(seqs), B - len(seqs)
        pos = [s.start_pos for s in seqs]
        blk = [p // bs for p in pos]
        host = torch.tensor([[s.token_ids[0] for s in seqs] + [0] * pad, pos + [0] * pad,
                             [s.block_table[b] * bs + p % bs for s, b, p in zip(seqs, blk, pos)] + [scratch * bs] * pad,
                             [p + 1 for p in pos] + [1] * pad, blk + [0] * pad,
                             [s.block_table[b] for s, b in zip(seqs, blk)] + [scratch] * pad], dtype=torch.long)
        w = max(blk, default=0) + 1
        rows = torch.tensor([s.block_table[:w] + [scratch] * (w - len(s.block_table[:w])) for s in seqs],
                            dtype=torch.long).reshape(n, w)
        dev = r.device
        self.meta[:, :B].copy_(host.to(dev, non_blocking=True))
        self.kv_len[:B].copy_(self.meta[3, :B])
        self.full_num[:B].copy_(self.meta[4, :B])
        self.last[:B, 0].copy_(self.meta[5, :B])
        # forget the last step's block tables, then map this step's (a block's first index in a row wins)
        u = max(self.used_width, w)
        self.phys_to_log.scatter_(1, self.tables[:, :u], -1)
        self.tables[:, :u].fill_(scratch)
        self.tables[:n, :w].copy_(rows.to(dev, non_blocking=True))
        self.phys_to_log.scatter_reduce_(1, self.tables[:B, :w], self.cols[:B, :w], "amin",
                                         include_self=False)
        self.tables32[:, :u].copy_(self.tables[:, :u])
        self.used_width = w

    def attend(self, q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, B: int) -> torch.Tensor:
        """One layer's decode attention: ``q [B, heads, hd]`` over the slots ``[slots, kv_heads, hd]``.

        GQA without repeating K/V: the ``rep`` query heads of a KV head are its ``rep`` query rows
        (any ``rep``; the kernel's own GQA needs a power of two).
        """
        r = self.runner
        k = k_slots.unsqueeze(0).transpose(1, 2)  # [1, kv_heads, slots, hd], a view of the cache
        v = v_slots.unsqueeze(0).transpose(1, 2)
        o = self.flex(q.reshape(B, r.num_kv_heads, self.rep, r.head_dim), k, v, block_mask=self.masks[B], scale=r.scale)
        return o.reshape(B, r.num_heads, r.head_dim)

    def forward(self, B: int) -> torch.Tensor:
        """The decode step of the ``B`` rows in the static buffers: their last hidden states ``[B, hidden]``."""
        r = self.runner
        slots = self.slots[:B]
        x, cos, sin = r._embed(self.tokens[:B], self.pos[:B], 0)
        for L, (k_slots, v_slots, _kc, _vc) in zip(r.fast_layers, r.kv_views):
            q, k, v = r._qkv(L, x, cos, sin)
            k_slots.index_copy_(0, slots, k)
            v_slots.index_copy_(0, slots, v)
            x = x + L.o(self.attend(q, k_slots, v_slots, B).reshape(B, r.q_width))
            x = r._mlp(L, x)
        return x

    def run(self, seqs) -> torch.Tensor:
        """The last hidden states ``[len(seqs), hidden]`` of a decode-only step (``size_for`` not None)."""
        B = self.size_for(len(seqs))
        self.prepare(seqs, B)
        graph = self.graphs.get(B)
        if graph is None:
            return self.forward(B)[: len(seqs)]
        graph.replay()
        return self.hidden[B][: len(seqs)]

    # ---- start-up ------------------------------------------------------------------------------
    def _warm_and_capture(self, graphs: bool) -> None:
        """Compile the kernel at every size (dummy rows on the scratch block), then capture each size's graph."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            for B in reversed(self.sizes):
                self.prepare([], B)
                self.forward(B)
            if graphs:
                torch.cuda.synchronize(self.runner.device)
                pool = None
                for B in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
                    self.prepare([], B)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        self.hidden[B] = self.forward(B)
                    pool = g.pool()
                    self.graphs[B] = g
                torch.cuda.synchronize(self.runner.device)
        logger.info("decode: paged flex attention compiled%s for batch sizes %s in %.1f s",
                    " and captured as CUDA graphs" if graphs else "", self.sizes, time.perf_counter() - t0)

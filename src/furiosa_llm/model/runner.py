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

import logging
import os

import torch
import torch.nn.functional as F

from furiosa_llm.hal import Batch, Bucket, SamplingSettings, SequenceChunk, StepResult

from .sampler import Sampler, token_logprobs

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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class ModelRunner:
    """Executes a ``Batch`` on ``cpu`` or ``cuda:N`` and samples; a ``BatchExecutor`` for the HAL."""

    DECODE_GROUP = 16  # decode rows attended together

    def __init__(self, hf_model, device: str, num_blocks: int, block_size: int, seed: int | None = None):
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
        self.jit_backend = os.environ.get("FURIOSA_LLM_JIT_BACKEND", "inductor")
        self._compiled: dict[Bucket, tuple] = {}
        self.sampler = Sampler(seed)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB) on %s",
            num_blocks, block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 2**20, self.device,
        )

    def _embed(self, input_ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token embeddings and the rotary cos/sin of their positions, shaped to broadcast over heads."""
        x = self.embed(input_ids)
        cos, sin = self.rotary(x[None], pos[None])
        return x, cos[0][:, None, :].to(x.dtype), sin[0][:, None, :].to(x.dtype)

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: Batch) -> StepResult:
        compiled = self._compiled.get(batch.bucket) if batch.bucket is not None else None
        if compiled is not None:
            return self._execute_compiled(batch, batch.bucket, *compiled)
        seqs = batch.sequences
        dev = self.device
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        offsets: list[int] = []
        for s in seqs:
            offsets.append(len(tokens))
            tokens += s.token_ids
            rng = range(s.start_pos, s.context_len)
            positions += rng
            bt = s.block_table
            slots += [bt[p // bs] * bs + p % bs for p in rng]
        total = len(tokens)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        slot = torch.tensor(slots, dtype=torch.long, device=dev)

        # decode rows (one query token) are attended in groups of similar context length,
        # each padded only to its group's longest context, so little padding is gathered
        dec = sorted((i for i, s in enumerate(seqs) if len(s.token_ids) == 1), key=lambda i: len(seqs[i].block_table))
        pre = [i for i, s in enumerate(seqs) if len(s.token_ids) > 1]
        dec_groups = []
        for g in range(0, len(dec), self.DECODE_GROUP):
            rows_i = dec[g : g + self.DECODE_GROUP]
            max_blocks = len(seqs[rows_i[-1]].block_table)
            bt = [b for i in rows_i for b in seqs[i].block_table + [0] * (max_blocks - len(seqs[i].block_table))]
            ctx = torch.tensor([seqs[i].context_len for i in rows_i], device=dev)
            mask = (torch.arange(max_blocks * bs, device=dev)[None, :] < ctx[:, None])[:, None, None, :]
            rows = torch.tensor([offsets[i] for i in rows_i], device=dev)
            dec_groups.append((rows, torch.tensor(bt, dtype=torch.long, device=dev), mask))

        x, cos, sin = self._embed(input_ids, pos)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(total, self.num_heads, self.head_dim)
            k = attn.k_proj(h).view(total, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(h).view(total, self.num_kv_heads, self.head_dim)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kc = self.kv_cache[li, 0]
            vc = self.kv_cache[li, 1]
            kc.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot, k)
            vc.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot, v)
            out = self._attention(q, k, v, kc, vc, seqs, offsets, pre, dec_groups)
            x = x + attn.o_proj(out.reshape(total, self.num_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self._sample(batch, x, offsets)

    def _attention(self, q, k, v, kc, vc, seqs, offsets, pre, dec_groups) -> torch.Tensor:
        out = torch.empty_like(q)
        nkv, hd, g = self.num_kv_heads, self.head_dim, self.num_heads // self.num_kv_heads
        for rows, bt, mask in dec_groups:
            b = rows.numel()
            # GQA without repeating K/V: the g query heads of a KV head act as g query rows
            qd = q.index_select(0, rows).view(b, nkv, g, hd)
            kd = kc.index_select(0, bt).view(b, -1, nkv, hd).transpose(1, 2)
            vd = vc.index_select(0, bt).view(b, -1, nkv, hd).transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=self.scale)
            out.index_copy_(0, rows, od.reshape(b, self.num_heads, hd))
        for i in pre:
            s = seqs[i]
            lo, n = offsets[i], len(s.token_ids)
            qs = q[lo : lo + n].transpose(0, 1)[None]  # [1, heads, n, hd]
            if s.start_pos == 0:
                ks = k[lo : lo + n].transpose(0, 1)[None]
                vs = v[lo : lo + n].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=g > 1)
            else:
                nb = -(-s.context_len // self.block_size)
                idx = torch.tensor(s.block_table[:nb], device=q.device)
                ks = kc.index_select(0, idx).view(-1, nkv, hd)[: s.context_len].transpose(0, 1)[None]
                vs = vc.index_select(0, idx).view(-1, nkv, hd)[: s.context_len].transpose(0, 1)[None]
                qpos = torch.arange(s.start_pos, s.context_len, device=q.device)
                mask = torch.arange(s.context_len, device=q.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=g > 1)
            out[lo : lo + n] = o[0].transpose(0, 1)
        return out

    # ---- JIT: compiled decode steps at padded bucket shapes -------------------------------------
    def _decode_unit(self, x, cos, sin, block_tables, mask, kv, start: int, end: int):
        """Layers ``start..end`` of a padded decode step; reads cached K/V, returns the new K/V unwritten.

        Each row attends to its cached positions (``mask``) plus its own new key, appended last.
        """
        b = x.shape[0]
        nkv, hd, g = self.num_kv_heads, self.head_dim, self.num_heads // self.num_kv_heads
        new_k, new_v = [], []
        for li in range(start, end):
            layer = self.layers[li]
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, self.num_heads, hd)
            k = attn.k_proj(h).view(b, nkv, hd)
            v = attn.v_proj(h).view(b, nkv, hd)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kc, vc = kv[li - start, 0], kv[li - start, 1]
            kd = kc.index_select(0, block_tables).view(b, -1, nkv, hd).transpose(1, 2)
            vd = vc.index_select(0, block_tables).view(b, -1, nkv, hd).transpose(1, 2)
            kd = torch.cat((kd, k.view(b, nkv, 1, hd)), dim=2)
            vd = torch.cat((vd, v.view(b, nkv, 1, hd)), dim=2)
            od = F.scaled_dot_product_attention(q.view(b, nkv, g, hd), kd, vd, attn_mask=mask, scale=self.scale)
            x = x + attn.o_proj(od.reshape(b, self.num_heads * hd))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
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
        so serving goes on, eagerly, meanwhile. Raises on failure.
        """
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
            x, cos, sin = self._embed(tokens, pos)
            for s, e in ranges:
                x, _k, _v = fn(x, cos, sin, tables, mask, self.kv_cache[s:e], s, e)
        self._compiled[bucket] = (fn, ranges)

    def _execute_compiled(self, batch: Batch, bucket: Bucket, fn, ranges) -> StepResult:
        seqs = batch.sequences
        tokens, pos, slots, tables, mask = self._bucket_inputs(bucket, seqs)
        x, cos, sin = self._embed(tokens, pos)
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
            logits = self.lm_head(self.norm(x.index_select(0, rows))).float()
            chunks = [seqs[i] for i in sampling]
            toks, lps = self.sampler.sample(logits, chunks)
            for c, t, lp in zip(chunks, toks, lps):
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
                h = self.norm(x[lo : lo + last - s.start_pos])
                lps = torch.log_softmax(self.lm_head(h).float(), dim=-1)
                targets = s.prompt_token_ids[s.start_pos + 1 : last + 1]
                entries += [token_logprobs(row, t, k if k >= 0 else row.numel()) for row, t in zip(lps, targets)]
            result.prompt_logprobs[s.request_id] = entries
        return result

"""A padding-free forward of a BERT encoder: the prompts of a step packed into one row of tokens.

Every linear layer, layer norm and activation runs on the packed ``[T, hidden]`` tokens of all
sequences (no padding, so no compute on pad tokens). Only attention needs sequences apart: the
sequences are sorted by length and cut into groups of similar length (``group_by_length``); each
group is gathered into a padded ``[B, H, L, D]`` block for ``scaled_dot_product_attention`` with a
key-padding mask and scattered back. The weights are the Hugging Face ``BertModel``'s own (Q, K and
V fused into one matrix at construction); the results equal its forward up to float rounding.

Supported: ``model_type`` "bert" with absolute position embeddings, post-layer-norm, the "gelu"
activations of ``transformers.activations``; ``supports(config)`` says so, and the pooling runner
falls back to the padded Hugging Face forward otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# a new attention group starts when a sequence is longer than GROUP_RATIO x the group's shortest + GROUP_SLACK
GROUP_RATIO = 1.3
GROUP_SLACK = 8


def supports(config) -> bool:
    """Whether ``PackedBertEncoder`` can run a model of this Hugging Face config."""
    return (getattr(config, "model_type", None) == "bert"
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and getattr(config, "hidden_act", None) in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
            and not getattr(config, "is_decoder", False))


def group_by_length(lengths: list[int]) -> list[list[int]]:
    """Indices of ``lengths`` sorted ascending and cut where a length passes ``GROUP_RATIO`` x the group's first + ``GROUP_SLACK``."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    limit = -1.0
    for i in order:
        if lengths[i] > limit:
            groups.append([])
            limit = lengths[i] * GROUP_RATIO + GROUP_SLACK
        groups[-1].append(i)
    return groups


class PackedBertEncoder:
    """``forward(token_ids per sequence) -> [T, hidden]`` packed hidden states (and the sequence offsets)."""

    def __init__(self, hf_model, device: torch.device) -> None:
        cfg = hf_model.config
        self.device = device
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.layer_norm_eps
        act = cfg.hidden_act
        self.act = (F.relu if act == "relu" else
                    (lambda x: F.gelu(x, approximate="tanh")) if act in ("gelu_new", "gelu_pytorch_tanh") else F.gelu)
        emb = hf_model.embeddings
        self.word = emb.word_embeddings.weight
        self.pos = emb.position_embeddings.weight
        self.type0 = emb.token_type_embeddings.weight[0]
        self.emb_ln = (emb.LayerNorm.weight, emb.LayerNorm.bias)
        self.layers = []
        for layer in hf_model.encoder.layer:
            sa = layer.attention.self
            self.layers.append((
                torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]).contiguous(),
                torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]).contiguous(),
                layer.attention.output.dense.weight, layer.attention.output.dense.bias,
                (layer.attention.output.LayerNorm.weight, layer.attention.output.LayerNorm.bias),
                layer.intermediate.dense.weight, layer.intermediate.dense.bias,
                layer.output.dense.weight, layer.output.dense.bias,
                (layer.output.LayerNorm.weight, layer.output.LayerNorm.bias),
            ))
        self.hidden = cfg.hidden_size

    def _attention_plan(self, lengths: list[int], starts: list[int]):
        """How attention reads the packed rows: ``gather`` ``[P]`` packed row per padded position (the groups'
        ``[B, L]`` blocks one after another; a pad position reads its sequence's first row, masked as a key),
        the groups ``(offset, B, L, key mask or None)``, and ``unpad`` ``[T]``: each packed row's padded position."""
        gather, unpad = [], [0] * (starts[-1] + lengths[-1])
        groups = []
        for group in group_by_length(lengths):
            L = max(lengths[i] for i in group)
            off = len(gather)
            for b, i in enumerate(group):
                a, n = starts[i], lengths[i]
                gather.extend(range(a, a + n))
                gather.extend([a] * (L - n))
                for j in range(n):
                    unpad[a + j] = off + b * L + j
            mask = None
            if any(lengths[i] != L for i in group):
                lens = torch.tensor([lengths[i] for i in group])
                mask = (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :].to(self.device)
            groups.append((off, len(group), L, mask))
        dev = self.device
        return torch.tensor(gather, device=dev), groups, torch.tensor(unpad, device=dev)

    def forward(self, seqs: list[list[int]]) -> tuple[torch.Tensor, list[int], list[int]]:
        """Packed final hidden states ``[T, hidden]`` (float), with each sequence's start and length."""
        lengths = [len(s) for s in seqs]
        starts, acc = [], 0
        for n in lengths:
            starts.append(acc)
            acc += n
        flat = [t for s in seqs for t in s]
        ids = torch.tensor(flat, dtype=torch.long, device=self.device)
        positions = torch.tensor([j for n in lengths for j in range(n)], dtype=torch.long, device=self.device)
        x = F.embedding(ids, self.word) + F.embedding(positions, self.pos) + self.type0
        x = F.layer_norm(x, (self.hidden,), *self.emb_ln, self.eps)
        gather, groups, unpad = self._attention_plan(lengths, starts)
        H, D, hid = self.num_heads, self.head_dim, self.hidden
        for wqkv, bqkv, wo, bo, ln1, w1, b1, w2, b2, ln2 in self.layers:
            padded = F.linear(x, wqkv, bqkv).index_select(0, gather)  # [P, 3*hidden]
            out = x.new_empty(padded.shape[0], hid)  # [P, hidden]
            for off, B, L, mask in groups:
                g = padded[off:off + B * L].view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)  # [3, B, H, L, D]
                o = F.scaled_dot_product_attention(g[0], g[1], g[2], attn_mask=mask)  # [B, H, L, D]
                out[off:off + B * L].view(B, L, H, D).copy_(o.transpose(1, 2))
            attn = out.index_select(0, unpad)  # [T, hidden]
            x = F.layer_norm(F.linear(attn, wo, bo) + x, (hid,), *ln1, self.eps)
            h = self.act(F.linear(x, w1, b1))
            x = F.layer_norm(F.linear(h, w2, b2) + x, (hid,), *ln2, self.eps)
        return x, starts, lengths

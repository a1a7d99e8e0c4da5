"""Paged, ref-counted KV block allocator with prefix caching by chained block hashes. No torch.

A block holds ``block_size`` token positions of K/V in every layer. A full block whose K/V are
computed gets a hash chained from its predecessor's, so a later request whose prompt starts
with the same tokens reuses it. Free blocks keep their hash until they are handed out again
(least recently freed first), so a freed prefix stays reusable as long as possible.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


def chain_hash(prev: int | None, tokens: Sequence[int]) -> int:
    return hash((prev, tuple(tokens)))


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class BlockTable:
    """A request's KV blocks: ``ids`` in position order, and its prefix-cache progress.

    The first ``num_hashed`` blocks are full and hashed; ``last_hash`` is the hash of the last
    of them (the chain continues from it). Changed only through the allocator's verbs.
    """

    ids: list[int] = field(default_factory=list)
    num_hashed: int = 0
    last_hash: int | None = None

    def __len__(self) -> int:
        return len(self.ids)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: must be >= 1")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def free_block_ids(self) -> list[int]:
        return list(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_hashes(self, token_ids: Sequence[int], num_blocks: int,
                     memo: list[tuple[int, tuple[int, ...]]] | None = None) -> list[tuple[int, tuple[int, ...]]]:
        """``(chain hash, token ids)`` of the first ``num_blocks`` full blocks of ``token_ids``.

        ``memo`` (a request's ``block_hashes``) keeps the entries already computed for the same token
        ids, which only ever grow at the end; it is extended in place and returned, so each block of a
        request is hashed once in its life however often it is looked up or committed.
        """
        entries = [] if memo is None else memo
        bs = self.block_size
        prev = entries[-1][0] if entries else None
        for i in range(len(entries), num_blocks):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            prev = hash((prev, tokens))  # chain_hash(prev, tokens), inlined
            entries.append((prev, tokens))
        return entries

    def cached_prefix(self, token_ids: Sequence[int], memo: list | None = None) -> list[int]:
        """Blocks holding the longest cached prefix of ``token_ids`` (``memo``: see ``block_hashes``).

        Only blocks that end before the last token count, so the last token is always computed
        (its logits are needed to sample). A hit is checked token by token, so a hash collision is a miss.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        get, blocks = self.hash_to_block.get, self.blocks
        for h, tokens in self.block_hashes(token_ids, (len(token_ids) - 1) // self.block_size, memo):
            bid = get(h)
            if bid is None or blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
        return hits

    def cost_of(self, block_table: Sequence[int], num_tokens: int, cached: Sequence[int] = ()) -> int:
        """Free blocks consumed if ``block_table`` + ``cached`` were grown to cover ``num_tokens``."""
        new = max(0, self.blocks_for(num_tokens) - len(block_table) - len(cached))
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return new + revived

    # ---- verbs on a request's block table -------------------------------------------------
    def admit(self, table: BlockTable, token_ids: Sequence[int], cached: Sequence[int], memo: list | None = None) -> bool:
        """Give an empty ``table`` the ``cached`` prefix blocks plus fresh ones to cover ``token_ids``.

        Returns False and changes nothing when there are not enough free blocks.
        """
        assert not table.ids, "admit() takes an empty block table"
        if not self._allocate(table.ids, len(token_ids), cached):
            return False
        self.commit(table, token_ids, len(cached) * self.block_size, memo)
        return True

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Append fresh blocks so ``table`` covers ``num_tokens``; False (and no change) when they are lacking."""
        ids = table.ids
        missing = -(-num_tokens // self.block_size) - len(ids)
        if missing <= 0:
            return True  # the common decode case: the last block has room
        if missing > len(self._free):
            return False
        self._take_fresh(ids, missing)
        return True

    def commit(self, table: BlockTable, token_ids: Sequence[int], num_computed: int, memo: list | None = None) -> None:
        """Offer the blocks of ``table`` that are now full of computed K/V to the prefix cache (``memo``: see
        ``block_hashes``)."""
        if not self.enable_prefix_caching:
            return
        num_hashed = table.num_hashed
        full = num_computed // self.block_size
        if full <= num_hashed:
            return
        entries = self.block_hashes(token_ids, full, memo)
        ids, blocks, hash_to_block = table.ids, self.blocks, self.hash_to_block
        for i in range(num_hashed, full):
            h, tokens = entries[i]
            block = blocks[ids[i]]
            if block.hash is None and h not in hash_to_block:
                block.hash = h
                block.token_ids = tokens
                hash_to_block[h] = block.block_id
        table.num_hashed, table.last_hash = full, entries[full - 1][0]

    def free(self, table: BlockTable) -> None:
        """Drop one reference to each block of ``table`` and empty it.

        The old id list is left as it was (a batch still in flight may hold it); the table gets a new one.
        """
        blocks, free = self.blocks, self._free
        for bid in reversed(table.ids):
            block = blocks[bid]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {bid} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                free[bid] = None
        table.ids = []
        table.num_hashed = 0
        table.last_hash = None

    def _allocate(self, ids: list[int], num_tokens: int, cached: Sequence[int] = ()) -> bool:
        if self.cost_of(ids, num_tokens, cached) > len(self._free):
            return False
        for bid in cached:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._free[bid]
            block.ref_count += 1
            ids.append(bid)
        self._take_fresh(ids, self.blocks_for(num_tokens) - len(ids))
        return True

    def _take_fresh(self, ids: list[int], n: int) -> None:
        """Append ``n`` free blocks to ``ids``, least recently freed first (the caller checked there are enough)."""
        blocks, popitem, hash_to_block, append = self.blocks, self._free.popitem, self.hash_to_block, ids.append
        for _ in range(n):
            block = blocks[popitem(False)[0]]
            if block.hash is not None:  # evict it from the prefix cache (its token_ids are stale until it is hashed again)
                del hash_to_block[block.hash]  # a block has a hash exactly while the cache maps that hash to it
                block.hash = None
            block.ref_count = 1
            append(block.block_id)

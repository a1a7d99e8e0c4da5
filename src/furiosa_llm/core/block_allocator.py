"""Paged, ref-counted KV block allocator with prefix caching by chained block hashes. No torch.

A block holds ``block_size`` token positions of K/V in every layer. A full block whose K/V are
computed gets a hash chained from its predecessor's, so a later request whose prompt starts
with the same tokens reuses it. Free blocks keep their hash until they are handed out again
(least recently freed first), so a freed prefix stays reusable as long as possible.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence


def chain_hash(prev: int | None, tokens: Sequence[int]) -> int:
    return hash((prev, tuple(tokens)))


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


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

    def cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached prefix of ``token_ids``.

        Only blocks that end before the last token count, so the last token is always computed
        (its logits are needed to sample).
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        prev: int | None = None
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(prev, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
            prev = h
        return hits

    def cost_of(self, block_table: Sequence[int], num_tokens: int, cached: Sequence[int] = ()) -> int:
        """Free blocks consumed if ``block_table`` + ``cached`` were grown to cover ``num_tokens``."""
        new = max(0, self.blocks_for(num_tokens) - len(block_table) - len(cached))
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return new + revived

    # ---- mutations -----------------------------------------------------------------------
    def allocate(self, block_table: list[int], num_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Grow ``block_table`` (in place) with ``cached`` blocks, then fresh ones, to cover ``num_tokens``.

        Returns False and changes nothing when there are not enough free blocks.
        """
        if not cached and len(block_table) * self.block_size >= num_tokens:
            return True  # the common decode case: the last block has room
        if self.cost_of(block_table, num_tokens, cached) > len(self._free):
            return False
        for bid in cached:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._free[bid]
            block.ref_count += 1
            block_table.append(bid)
        while len(block_table) * self.block_size < num_tokens:
            bid, _ = self._free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None:
                if self.hash_to_block.get(block.hash) == bid:
                    del self.hash_to_block[block.hash]
                block.hash = None
                block.token_ids = ()
            block.ref_count = 1
            block_table.append(bid)
        return True

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block of ``block_table``; the caller drops the table itself.

        The list is left as it is: a batch still in flight may hold it as its block table.
        """
        for bid in reversed(block_table):
            block = self.blocks[bid]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {bid} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None

    def cache_full_blocks(
        self, block_table: Sequence[int], token_ids: Sequence[int], num_computed: int,
        num_hashed: int, last_hash: int | None,
    ) -> tuple[int, int | None]:
        """Hash the blocks of ``block_table`` that became full with computed tokens.

        Returns the new ``(num_hashed, last_hash)`` pair the caller keeps for the request.
        """
        if not self.enable_prefix_caching:
            return num_hashed, last_hash
        bs = self.block_size
        while (num_hashed + 1) * bs <= num_computed:
            tokens = tuple(token_ids[num_hashed * bs : (num_hashed + 1) * bs])
            h = chain_hash(last_hash, tokens)
            block = self.blocks[block_table[num_hashed]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash = h
                block.token_ids = tokens
                self.hash_to_block[h] = block.block_id
            num_hashed += 1
            last_hash = h
        return num_hashed, last_hash

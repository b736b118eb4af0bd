"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, a free list and a prefix cache.

Plain Python (no torch); the runner owns the actual KV tensors and indexes them by the block ids kept here.

Prefix caching (the idea of vLLM's automatic prefix caching): a *full* block is identified by
hash(adapter uid, hash of the previous block, the block's token ids). The adapter uid is part of the key
because the KV of the same tokens differs per adapter, so two adapters never share blocks. Freed blocks keep
their hash while they sit in the free list and are reused on a later hit until the allocator hands them out
again, oldest freed first. A hit is confirmed by comparing token ids, so a hash collision is never served.
"""
from collections import OrderedDict
from dataclasses import dataclass

from .request import Request


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    salt: tuple = ()


def block_hash(salt, prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chain hash of one full block; `salt` is the request's `prefix_salt` (adapter uid and tenant), so a
    block is only ever shared by requests of the same adapter load and the same tenant."""
    return hash((salt, prev_hash, token_ids))


class BlockManager:
    """Allocates KV blocks to requests.

    Args:
        num_blocks: blocks in the KV cache, >= 1.
        block_size: tokens per block, >= 1.
        enable_prefix_caching: reuse full blocks across requests with the same adapter and prefix.

    Raises:
        ValueError on a non-positive size.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r}: must be an integer >= 1")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r}: must be an integer >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- capacity -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request: Request, num_new_tokens: int, cached: list[int] = ()) -> int:
        """Blocks to take from the free list so the table covers the computed tokens, the `cached` prefix
        blocks about to be attached and `num_new_tokens` more."""
        need = self.blocks_for(request.num_computed_tokens + len(cached) * self.block_size + num_new_tokens)
        return max(0, need - len(request.block_table) - len(cached))

    def can_allocate(self, request: Request, num_new_tokens: int, cached: list[int] = ()) -> bool:
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # cached-but-free blocks leave the list
        return self.num_new_blocks(request, num_new_tokens, cached) + revived <= len(self._free)

    # -- prefix cache ---------------------------------------------------------------------------------------
    def lookup_prefix(self, request: Request) -> list[int]:
        """Block ids caching the longest prefix of the request's tokens; no side effects.

        At most `num_tokens - 1` tokens are matched, so at least one token is computed to produce logits.
        Only for a request holding no blocks (new, or resumed after preemption).
        """
        if not self.enable_prefix_caching or request.block_table:
            return []
        tokens, bs, out, prev = request.all_token_ids, self.block_size, [], None
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = block_hash(request.prefix_salt, prev, chunk)
            bid = self._by_hash.get(h)
            if bid is None:
                break
            blk = self.blocks[bid]
            if blk.token_ids != chunk or blk.salt != request.prefix_salt or blk.hash != h:
                break
            out.append(bid)
            prev = h
        return out

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed full blocks (call after their KV is computed)."""
        if not self.enable_prefix_caching:
            return
        bs, tokens = self.block_size, None
        n_full = min(request.num_computed_tokens // bs, len(request.block_table))
        prev = request.block_hashes[-1] if request.block_hashes else None
        for i in range(len(request.block_hashes), n_full):
            tokens = tokens or request.all_token_ids
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = block_hash(request.prefix_salt, prev, chunk)
            blk = self.blocks[request.block_table[i]]
            if blk.hash is None:
                blk.hash, blk.token_ids, blk.salt = h, chunk, request.prefix_salt
                self._by_hash.setdefault(h, blk.block_id)
            request.block_hashes.append(h)
            prev = h

    # -- allocation -----------------------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Grow the request's block table for `num_new_tokens` more tokens, first attaching `cached` prefix
        blocks from `lookup_prefix` (which advances `num_computed_tokens`). All or nothing: returns False,
        changing nothing, when the free list is too short.
        """
        if not self.can_allocate(request, num_new_tokens, cached):
            return False
        if cached:
            self.prefix_query_tokens += request.num_tokens
            for bid in cached:
                blk = self.blocks[bid]
                if blk.ref_count == 0:
                    del self._free[bid]
                blk.ref_count += 1
                request.block_table.append(bid)
                request.block_hashes.append(blk.hash)
            hit = len(cached) * self.block_size
            request.num_computed_tokens += hit
            request.num_cached_tokens = hit
            self.prefix_hit_tokens += hit
        elif self.enable_prefix_caching and not request.block_table:
            self.prefix_query_tokens += request.num_tokens
        for _ in range(self.num_new_blocks(request, num_new_tokens)):
            request.block_table.append(self._take_free())
        return True

    def append_slot(self, request: Request) -> bool:
        """Room for one more token (a decode step); False when no block is free."""
        return self.allocate(request, 1)

    def free(self, request: Request) -> None:
        """Drop the request's references; blocks reaching zero go to the back of the free list."""
        for bid in reversed(request.block_table):  # tail first: the least reusable blocks get recycled first
            blk = self.blocks[bid]
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self._free[bid] = None
        request.block_table = []
        request.block_hashes = []
        request.num_computed_tokens = 0

    def _take_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        blk = self.blocks[bid]
        if blk.hash is not None and self._by_hash.get(blk.hash) == bid:
            del self._by_hash[blk.hash]
        blk.hash, blk.token_ids, blk.salt, blk.ref_count = None, (), (), 1
        return bid

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after the base weights change)."""
        self._by_hash.clear()
        for blk in self.blocks:
            blk.hash, blk.token_ids = None, ()

    def stats(self) -> dict:
        """Counters for /metrics."""
        return {"num_blocks": self.num_blocks, "free_blocks": len(self._free), "usage": self.usage(),
                "cached_blocks": len(self._by_hash), "prefix_query_tokens": self.prefix_query_tokens,
                "prefix_hit_tokens": self.prefix_hit_tokens}

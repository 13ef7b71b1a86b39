"""The paged KV cache's bookkeeping: blocks, block tables, prefix hashes, LRU.

This module only allocates; the scheduler decides (vLLM V1's split). The KV
tensors themselves live with the executor, shaped (num_blocks, block_size, ...);
here a block is an int and a request's block table is the list of blocks that
hold its tokens, in order: token t of a request lives in slot t % block_size
of block_table[t // block_size].

Choices, so the executor and the scheduler can rely on them:
- Block 0 is the null block: never handed out. A padded batch slot (CUDA
  graphs, bucketed batch sizes) can point at it and write harmlessly. So
  `num_blocks` blocks give `num_blocks - 1` usable ones.
- A block is hashed once every one of its tokens has been *computed*
  (`cache_full_blocks`, called by the scheduler after each step), not when it
  is allocated: a request can then never hit a block whose KV is still being
  written in the same step, whatever order the executor runs the batch in.
  The price: identical prompts admitted in the same step (or n > 1 siblings)
  compute their shared prefix once each in that first step.
- The hash of a full block is a 128-bit blake2b digest of (its parent block's
  hash, its token ids), so equal prefixes, and only those, share blocks.
- Free blocks sit in one LRU queue; allocation takes from its front. A freed
  block with a hash goes to the back (it can be hit again before it is
  evicted); a freed block without one goes to the front (it holds nothing
  worth keeping). A request's blocks are freed tail first, so of one request
  its last blocks (the least shared) are evicted first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Optional

from moray.serve.engine.request import Request

NULL_BLOCK = 0


def hash_block_tokens(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """The key of a full block: everything before it (the parent's hash) and its tokens."""
    return hashlib.blake2b(parent_hash + array("q", token_ids).tobytes(), digest_size=16).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need at least 2 (block 0 is the null block)")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self._block_hash: list[Optional[bytes]] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> block holding that prefix
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._tables: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}  # leading blocks of a table already hashed
        self.prefix_queries = 0  # tokens looked up at admission
        self.prefix_hits = 0  # of those, tokens found in the cache

    # ------------------------------------------------------------------ sizes

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones among them can still be hit)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks held by requests."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] if it holds none)."""
        return list(self._tables.get(request_id, ()))

    # ------------------------------------------------------------ prefix cache

    def _update_hashes(self, request: Request) -> list[bytes]:
        """Extend request.block_hashes to every full block of its known tokens."""
        hashes, bs = request.block_hashes, self.block_size
        n_full = request.num_tokens // bs
        while len(hashes) < n_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else b""
            hashes.append(hash_block_tokens(parent, request.token_ids_slice(i * bs, (i + 1) * bs)))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of the request's known tokens, as (blocks, tokens).

        Never all of them: the last token is always recomputed so there are
        logits to sample from. Nothing is owned until allocate_slots takes them,
        and the hit counts in prefix_queries/prefix_hits only then (a lookup for
        a request that must wait is not counted twice).
        """
        if not self.enable_prefix_caching:
            return [], 0
        hashes = self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for h in hashes[:max_blocks]:
            b = self._cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks, len(blocks) * self.block_size

    def cache_full_blocks(self, request: Request, num_tokens: Optional[int] = None) -> None:
        """Hash and register the request's blocks that are full of computed tokens, or, with
        num_tokens, of the first num_tokens known tokens (the scheduler keys an admitted
        prompt's blocks as it schedules them: a request admitted later in the same step, such
        as the next of n samples, then shares them, since every layer writes the step's K/V
        before any of its tokens attends)."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        table = self._tables.get(rid)
        if table is None:
            return
        upto = request.num_computed_tokens if num_tokens is None else min(num_tokens, request.num_tokens)
        n_full = min(upto // self.block_size, len(table))
        start = self._num_hashed.get(rid, 0)
        if n_full <= start:
            return
        hashes = self._update_hashes(request)
        for i in range(start, n_full):
            h, b = hashes[i], table[i]
            if self._block_hash[b] is None and h not in self._cached:
                self._block_hash[b] = h
                self._cached[h] = b
            # else: b is a hit (already keyed), or a duplicate computed alongside the
            # block that holds this prefix; the duplicate stays unkeyed and is freed as such.
        self._num_hashed[rid] = n_full

    def reset_prefix_cache(self) -> None:
        """Forget every hash (blocks in use keep their contents, just no longer shareable)."""
        for b in self._cached.values():
            self._block_hash[b] = None
        self._cached.clear()

    # -------------------------------------------------------------- allocation

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Optional[list[int]] = None) -> Optional[list[int]]:
        """Room for num_new_tokens more tokens after the request's computed ones.

        new_computed_blocks (from get_computed_blocks, at admission; pass []
        for a miss so the lookup is counted) come first: their tokens count as
        computed and the request takes a reference on them. Returns the blocks allocated now ([] if none were needed), or
        None, changing nothing, when there are not enough free blocks.
        """
        rid = request.request_id
        computed = new_computed_blocks or []
        table = self._tables.get(rid, [])
        num_tokens = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_new_blocks = max(0, self.blocks_for(num_tokens) - len(table) - len(computed))
        # Hit blocks nobody holds sit in the free queue: taking them costs free blocks too.
        num_revived = sum(1 for b in computed if self.ref_cnt[b] == 0)
        if num_new_blocks + num_revived > self.num_free_blocks:
            return None
        for b in computed:
            if self.ref_cnt[b] == 0:
                del self._free[b]
            self.ref_cnt[b] += 1
        if rid not in self._tables:
            self._tables[rid] = table
            self._num_hashed[rid] = len(computed)
        table.extend(computed)
        new_blocks = [self._pop_free() for _ in range(num_new_blocks)]
        table.extend(new_blocks)
        if new_computed_blocks is not None and self.enable_prefix_caching:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += len(computed) * self.block_size
        return new_blocks

    def _pop_free(self) -> int:
        b, _ = self._free.popitem(last=False)  # the least recently freed
        h = self._block_hash[b]
        if h is not None:  # evict its prefix
            self._block_hash[b] = None
            del self._cached[h]
        self.ref_cnt[b] = 1
        return b

    def free(self, request: Request) -> None:
        """Give back every block the request holds (a no-op if it holds none)."""
        rid = request.request_id
        table = self._tables.pop(rid, None)
        self._num_hashed.pop(rid, None)
        if table is None:
            return
        for b in reversed(table):
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self._free[b] = None
                if self._block_hash[b] is None:
                    self._free.move_to_end(b, last=False)

"""Automatic prefix caching: a content-addressed table of full KV blocks, owned by the scheduler.

The scheduler lays out KV, so it knows which block holds which tokens. A *full*
block whose KV is computed is registered under a key made of its tokens and the
hash of the key of the block before it (a chain, so a key names the whole
prefix up to and including the block). A new request whose leading full blocks
have registered keys takes references on those blocks instead of computing
them: its ``num_computed_tokens`` starts at the cached length and the executor
computes only the rest, attending over the shared blocks. See docs/scheduler.md
("Prefix caching").

Rules (the ones vLLM v1's KV cache manager follows):

* only FULL blocks are shared, and a lookup never covers the last token of a
  sequence (at most ``(num_tokens - 1) // block_size`` blocks), so a request
  always computes at least one token to sample from, and it only ever writes
  KV into blocks it holds alone: no copy-on-write;
* blocks are reference counted; a block whose count drops to 0 keeps its KV
  and its key, in a least-recently-used free queue, and is only evicted (key
  dropped, block reused) when no never-cached free block is left;
* blocks a step is about to compute are registered when the step is planned
  but become visible to lookups only from the next ``schedule`` call (steps run
  in order on one executor, so the KV is there before any later step reads it);
* decode tokens are not registered (a preempted request's outputs are, when its
  recompute prefill covers them).

Dict keys are ``(parent_hash, tokens)``, so equal keys compare the tokens
exactly; only a collision of two different prefixes' 64-bit parent hashes
combined with identical block tokens could alias, as in vLLM with its builtin hash.

Without token ids (the simulator's length-only traces) nothing is ever
registered or matched, and blocks are handed out exactly as by
:class:`~scheduler_svc.core.kv_blocks.BlockAllocator` (from its free stack).
"""

from __future__ import annotations

from collections import OrderedDict

from scheduler_svc.core.kv_blocks import BlockAllocator
from scheduler_svc.core.request import Request

ROOT_HASH = 0x5EED  # the parent hash of a sequence's first block


def _block_tokens(req: Request, i: int, bs: int) -> tuple[int, ...]:
    """Token ids of ``req``'s block ``i`` (prompt, then outputs so far)."""
    lo, hi, n_prompt = i * bs, (i + 1) * bs, req.num_prompt_tokens
    if hi <= n_prompt:
        return tuple(req.prompt_token_ids[lo:hi])
    return tuple(req.prompt_token_ids[lo:n_prompt]) + tuple(req.output_token_ids[max(0, lo - n_prompt):hi - n_prompt])


def block_hashes(req: Request, num_blocks: int, bs: int) -> list[int]:
    """Chained hashes of ``req``'s first ``num_blocks`` full blocks of ``bs`` tokens (prompt + outputs so far).

    Memoized on the request (``req.block_hashes``): tokens are only ever appended,
    so hashes computed once stay valid and later calls only extend the list.
    """
    memo = req.block_hashes
    if memo is None:
        memo = req.block_hashes = []
    parent = memo[-1] if memo else ROOT_HASH
    for i in range(len(memo), num_blocks):
        parent = hash((parent, _block_tokens(req, i, bs)))
        memo.append(parent)
    return memo


def _key(req: Request, i: int, hashes: list[int], bs: int) -> tuple:
    """The table key of ``req``'s block ``i``: (parent hash, the block's tokens)."""
    return (hashes[i - 1] if i else ROOT_HASH, _block_tokens(req, i, bs))


class PrefixCachingAllocator(BlockAllocator):
    """A :class:`BlockAllocator` whose full blocks are shared by content (see the module docstring).

    Free blocks are of two kinds: never-cached (the base class's free stack,
    used first) and cached (an LRU queue, evicted oldest-first when the heap is
    empty). Both count as free: ``used_fraction`` is the share of referenced blocks.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, watermark: float = 0.01) -> None:
        super().__init__(num_blocks, block_size, watermark)
        self._refs = [0] * num_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # free cached blocks, least recent first
        self._table: dict[tuple, int] = {}  # key -> block holding that content
        self._key_of: dict[int, tuple] = {}  # block -> its key (registered blocks, free or held)
        self._num_registered: dict[str, int] = {}  # req_id -> leading blocks already offered to the table
        self._pending: list[tuple[int, tuple]] = []  # (block, key) registered at the next commit
        self.num_query_tokens = 0  # vLLM's prefix_cache_queries: tokens looked up at admission
        self.num_hit_tokens = 0  # vLLM's prefix_cache_hits: of those, tokens found cached
        self.num_evictions = 0

    # ---- queries ----
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free) - len(self._lru)

    def used_fraction(self) -> float:
        return (self.num_blocks - len(self._free) - len(self._lru)) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the table (held or free)."""
        return len(self._key_of)

    def can_append(self) -> bool:
        return bool(self._free) or bool(self._lru)

    def match(self, req: Request) -> list[int]:
        """Blocks holding ``req``'s longest cached prefix of full blocks (never its last token).

        None for a request that wants prompt logprobs: every prompt position must be computed for
        them (as in vLLM; docs/gateway.md, "Log probabilities"). Its blocks are still cached for others.
        """
        if req.prompt_token_ids is None or req.sampling.prompt_logprobs is not None:
            return []
        n = (req.num_tokens - 1) // self.block_size
        if n <= 0:
            return []
        table, bs = self._table, self.block_size
        if not table:
            return []
        hits: list[int] = []
        for i in range(n):
            hashes = block_hashes(req, i, bs)  # key i needs the hash of block i - 1 (memoized)
            b = table.get(_key(req, i, hashes, bs))  # the dict compares the tokens exactly
            if b is None:
                break
            hits.append(b)
        return hits

    def can_allocate_with(self, num_tokens: int, hits: list[int]) -> bool:
        """``can_allocate`` for a request whose first ``len(hits)`` blocks are cached.

        Hit blocks sitting in the free queue stop being free when taken.
        """
        refs = self._refs
        revived = sum(1 for b in hits if not refs[b])
        new = self.blocks_for(num_tokens) - len(hits)
        return self.num_free_blocks - revived - new >= self.watermark_blocks

    # ---- mutations ----
    def allocate_with(self, req_id: str, num_tokens: int, hits: list[int]) -> list[int]:
        """Blocks for a new request: references on ``hits`` (its cached prefix), then fresh ones.

        Hits are taken first, so the fresh blocks never evict the prefix being reused.
        """
        if req_id in self._tables:
            raise ValueError(f"request {req_id!r} already holds blocks")
        refs, lru = self._refs, self._lru
        need = self.blocks_for(num_tokens) - len(hits)
        revived = sum(1 for b in hits if not refs[b]) if hits else 0
        if need + revived > self.num_free_blocks:
            raise MemoryError(f"need {need + revived} blocks for {req_id!r}, {self.num_free_blocks} free")
        for b in hits:
            if not refs[b]:
                del lru[b]
            refs[b] += 1
        ids = list(hits)
        if 0 < need <= len(self._free):  # the common case: never-cached blocks suffice (what ``_take`` would pick)
            fresh = self._pop_free(need)
            for b in fresh:
                refs[b] = 1
            ids += fresh
        else:
            ids.extend(self._take() for _ in range(need))
        self._tables[req_id] = ids
        self._num_registered[req_id] = len(hits)
        return list(ids)

    def allocate(self, req_id: str, num_tokens: int) -> list[int]:
        return self.allocate_with(req_id, num_tokens, [])

    def append(self, req_id: str, num_tokens_after: int) -> tuple[int, ...]:
        table = self._tables[req_id]
        if num_tokens_after <= len(table) * self.block_size:
            return ()
        need = self.blocks_for(num_tokens_after) - len(table)
        if need == 1 and self._free:  # a decode's next block, never-cached (what ``_take`` would pick)
            b = self._free.pop()
            self._refs[b] = 1
            table.append(b)
            return (b,)
        if need > self.num_free_blocks:
            raise MemoryError(f"need {need} more blocks for {req_id!r}, {self.num_free_blocks} free")
        added = tuple(self._take() for _ in range(need))
        table.extend(added)
        return added

    def free(self, req_id: str) -> int:
        """Drop ``req_id``'s references; blocks at 0 keep their content in the LRU queue
        (tail blocks first, so a shared prefix outlives the suffixes hanging off it)."""
        self._num_registered.pop(req_id, None)
        ids = self._tables.pop(req_id, None)
        if not ids:
            return 0
        refs, lru, key_of, free = self._refs, self._lru, self._key_of, self._free
        if not key_of:  # nothing registered, so nothing shared (length-only requests): every count is 1
            for b in ids:
                refs[b] = 0
            free.extend(reversed(ids))
            return len(ids)
        for b in reversed(ids):
            refs[b] -= 1
            if not refs[b]:
                if b in key_of:
                    lru[b] = None
                else:
                    free.append(b)
        return len(ids)

    def register(self, req: Request, num_computed_after: int) -> None:
        """Offer ``req``'s blocks that are full once ``num_computed_after`` tokens have KV.

        They join the table at the next :meth:`commit` (the step computing them runs first).
        """
        if req.prompt_token_ids is None:
            return
        rid = req.req_id
        done = self._num_registered.get(rid)
        if done is None:
            return
        full = min(num_computed_after, req.num_tokens) // self.block_size
        if full <= done:
            return
        bs = self.block_size
        hashes = block_hashes(req, full, bs)
        table = self._tables[rid]
        pending = self._pending
        for i in range(done, full):
            pending.append((table[i], _key(req, i, hashes, bs)))
        self._num_registered[rid] = full

    def commit(self) -> None:
        """Make the blocks registered since the last commit visible to :meth:`match`."""
        table, key_of, refs = self._table, self._key_of, self._refs
        for b, key in self._pending:
            # skip a block already freed again (nothing can reuse it before its step runs,
            # but it holds no reference to keep it out of the heap), and a duplicate
            # of content another block already holds (that one stays the cached copy)
            if refs[b] and key not in table and b not in key_of:
                table[key] = b
                key_of[b] = key
        self._pending.clear()

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_query_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def reset(self) -> None:
        """Forget every block and its content (the executor's KV is gone)."""
        self._tables.clear()
        self._num_registered.clear()
        self._pending.clear()
        self._table.clear()
        self._key_of.clear()
        self._lru.clear()
        self._refs = [0] * self.num_blocks
        self._free = list(range(self.num_blocks - 1, -1, -1))

    def _take(self) -> int:
        """One free block: never-cached first (the top of the stack), else evict the least recently used."""
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._lru.popitem(last=False)
            del self._table[self._key_of.pop(b)]
            self.num_evictions += 1
        self._refs[b] = 1
        return b

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (used by tests)."""
        held: dict[int, int] = {}
        for t in self._tables.values():
            assert len(t) == len(set(t)), "a request holds a block twice"
            for b in t:
                held[b] = held.get(b, 0) + 1
        for b in range(self.num_blocks):
            assert self._refs[b] == held.get(b, 0), f"block {b}: refcount {self._refs[b]} != holders {held.get(b, 0)}"
        free = set(self._free)
        lru = set(self._lru)
        assert len(free) == len(self._free), "a block is free twice"
        assert not free & lru, "a block is in both free queues"
        assert not (free | lru) & held.keys(), "a referenced block is free"
        assert len(free) + len(lru) + len(held) == self.num_blocks, "blocks leaked"
        assert all(b in self._key_of for b in lru), "a cached free block has no key"
        assert not free & self._key_of.keys(), "a never-cached free block has a key"
        assert len(self._table) == len(self._key_of), "table and reverse map disagree"
        for key, b in self._table.items():
            assert self._key_of[b] == key, f"block {b} is registered under another key"

"""Paged KV block manager: the scheduler owns placement; executors only hold the memory.

Blocks hold ``block_size`` tokens (16, as in the paper). The rules are the ones
the authors' code uses for every policy:

* ``can_allocate(n)``: after taking ``ceil(n / block_size)`` blocks, at least
  ``watermark`` of all blocks stay free (1%);
* ``can_append()``: at least one free block *anywhere* (a global check, even when
  the request's last block still has room: that is what the authors' code does);
* ``append(req_id, num_tokens)`` takes a new block only when the last is full;
* ``free(req_id)`` returns everything (finish, abort and recompute preemption).

Free blocks form a stack: a request's blocks are taken from its top and a freed
table goes back on it with its first block on top (vLLM's free block queue also
hands back recently freed blocks first). Blocks start as 0, 1, 2, ... from the
top, and placements are deterministic for a given sequence of calls. A stack
and not a lowest-first heap: taking or returning a request's blocks is a slice
or an ``extend`` (C), not a sift per block, which was ~5% of a simulation
(docs/results.md, *Simulator speed*).
"""

from __future__ import annotations


class BlockAllocator:
    """Tracks which request owns which KV block. Pure bookkeeping, no memory."""

    def __init__(self, num_blocks: int, block_size: int = 16, watermark: float = 0.01) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack of free ids, top last
        self._tables: dict[str, list[int]] = {}

    # ---- queries ----
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def used_fraction(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def block_tables(self) -> dict[str, list[int]]:
        """Every request's live block table (read only): the decode hot path checks the last block's
        room here and calls :meth:`append` only when a new block is needed."""
        return self._tables

    def block_table(self, req_id: str) -> list[int]:
        """The request's blocks in token order (a copy)."""
        return list(self._tables.get(req_id, ()))

    def owns_blocks(self, req_id: str) -> bool:
        return req_id in self._tables

    def can_allocate(self, num_tokens: int) -> bool:
        return self.num_free_blocks - self.blocks_for(num_tokens) >= self.watermark_blocks

    def can_append(self) -> bool:
        return bool(self._free)

    # ---- mutations ----
    def allocate(self, req_id: str, num_tokens: int) -> list[int]:
        """Give a new request blocks for ``num_tokens`` tokens; returns their ids."""
        if req_id in self._tables:
            raise ValueError(f"request {req_id!r} already holds blocks")
        n = self.blocks_for(num_tokens)
        if n > self.num_free_blocks:
            raise MemoryError(f"need {n} blocks for {req_id!r}, {self.num_free_blocks} free")
        ids = self._pop_free(n)
        self._tables[req_id] = ids
        return list(ids)

    def append(self, req_id: str, num_tokens_after: int) -> tuple[int, ...]:
        """Grow ``req_id``'s table to cover ``num_tokens_after`` tokens.

        Returns the ids of the blocks added (usually none, sometimes one).
        """
        table = self._tables[req_id]
        if num_tokens_after <= len(table) * self.block_size:
            return ()  # the common decode case: the last block has room
        need = self.blocks_for(num_tokens_after) - len(table)
        if need > self.num_free_blocks:
            raise MemoryError(f"need {need} more blocks for {req_id!r}, {self.num_free_blocks} free")
        added = tuple(self._pop_free(need))
        table.extend(added)
        return added

    def free(self, req_id: str) -> int:
        """Release every block of ``req_id`` (no-op if it holds none)."""
        ids = self._tables.pop(req_id, None)
        if not ids:
            return 0
        self._free.extend(reversed(ids))
        return len(ids)

    def _pop_free(self, n: int) -> list[int]:
        """The top ``n`` (>= 1) free blocks, topmost first, taken off the stack (one slice, no loop)."""
        free = self._free
        ids = free[-n:]
        del free[-n:]
        ids.reverse()
        return ids

    def check_invariants(self) -> None:
        """Raise AssertionError if bookkeeping is inconsistent (used by tests)."""
        owned = [b for t in self._tables.values() for b in t]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert not set(owned) & set(self._free), "a block is both owned and free"
        assert len(owned) + len(self._free) == self.num_blocks, "blocks leaked"

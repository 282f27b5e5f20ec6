"""The mechanism a policy uses to build one iteration's batch.

Policies decide *order, chunk sizes and victims*; this class does the
bookkeeping that every policy shares: token and sequence counting, KV block
allocation, recompute preemption, and the slices that go into the plan. Policies
never touch the allocator directly; both see the core only through
``scheduler_svc.core.view.CoreView``.
"""

from __future__ import annotations

from typing import Callable

from contract.plan import CachedRequestSlice, NewRequestSlice
from scheduler_svc.core.request import Request, RequestStatus
from scheduler_svc.core.view import CoreView

VictimFn = Callable[[Request], "Request | None"]


class BatchBuilder:
    """Accumulates one step's work. Created by the core for each ``schedule`` call."""

    def __init__(self, core: CoreView, now: float) -> None:
        self.core = core
        self.now = now
        self.config = core.config
        self.token_budget = core.config.token_budget  # a policy may size each step differently
        self.num_tokens = 0
        self.num_prefill_tokens = 0
        self.num_decodes = 0
        self.num_preempted = 0
        self.num_critical = 0  # set by deadline-aware policies (SLAI, EDF)
        self.num_cache_queries = 0  # prefix caching: prompt tokens looked up at admission
        self.num_cache_hits = 0  # and found cached
        self.offset = 0.0  # SLAI's delta in force, for telemetry
        self.new: list[NewRequestSlice] = []
        self.cached: list[CachedRequestSlice] = []
        self.scheduled: dict[str, Request] = {}  # in scheduling order
        self._prefix = core.prefix_cache  # None: prefix caching off

    # ---- budget ----
    @property
    def budget_left(self) -> int:
        return self.token_budget - self.num_tokens

    def is_scheduled(self, req: Request) -> bool:
        return req.req_id in self.scheduled

    # ---- admission of a waiting request ----
    def can_admit(self, req: Request) -> bool:
        """KV for the whole prompt fits above the watermark and the seq cap allows it.

        A request preempted while its last token is still in flight (pipelined
        scheduling) waits for that token: a recompute must carry every token id.
        """
        if len(self.core.running) >= self.config.max_num_seqs or req.num_pending_outputs:
            return False
        if self._prefix is None or req.prompt_token_ids is None:
            return self.core.allocator.can_allocate(req.num_tokens)
        # the lookup sets req.num_computed_tokens to the cached prefix, so the policy's
        # chunk (num_uncomputed_tokens) and the KV check count only the uncached part
        return self._prefix.can_allocate_with(req.num_tokens, self.core.match_prefix(req))

    def admit(self, req: Request, num_new_tokens: int) -> None:
        """Allocate blocks for ``req``'s whole prompt and schedule its first chunk.

        The caller has popped ``req`` from its waiting queue and checked ``can_admit``.
        With prefix caching, the blocks of its cached prefix are shared and only the
        rest is computed (``num_computed_tokens`` starts at the cached length).
        """
        pc = self._prefix
        if pc is not None and req.prompt_token_ids is not None:
            # look up again: blocks matched by can_admit may have been evicted since
            hits = self.core.match_prefix(req)
            num_new_tokens = min(num_new_tokens, req.num_uncomputed_tokens)
            self._check_chunk(req, num_new_tokens)
            block_ids = pc.allocate_with(req.req_id, req.num_tokens, hits)
            pc.record_lookup(req.num_tokens, req.num_computed_tokens)
            self.num_cache_queries += req.num_tokens
            self.num_cache_hits += req.num_computed_tokens
            pc.register(req, req.num_computed_tokens + num_new_tokens)
        else:
            self._check_chunk(req, num_new_tokens)
            block_ids = self.core.allocator.allocate(req.req_id, req.num_tokens)
        self.core.on_admitted(req, self.now)
        ids = req.all_token_ids()
        self.new.append(NewRequestSlice(
            req_id=req.req_id,
            token_ids=ids if ids is not None else (),
            num_tokens=req.num_tokens,
            sampling=req.sampling,
            block_ids=tuple(block_ids),
            num_computed_tokens=req.num_computed_tokens,
            num_new_tokens=num_new_tokens,
            sample=req.num_computed_tokens + num_new_tokens == req.num_tokens,
            num_prompt_tokens=req.num_prompt_tokens,
        ))
        self._count(req, num_new_tokens, is_decode=False)

    # ---- continuing work of an admitted request ----
    def add_chunk(self, req: Request, num_new_tokens: int) -> None:
        """Continue a paused prefill; its blocks were allocated at admission."""
        self._check_chunk(req, num_new_tokens)
        self.cached.append(CachedRequestSlice(
            req.req_id, (), req.num_computed_tokens, num_new_tokens, False,
            req.num_computed_tokens + num_new_tokens == req.num_tokens))
        if self._prefix is not None:
            self._prefix.register(req, req.num_computed_tokens + num_new_tokens)
        self._count(req, num_new_tokens, is_decode=False)

    def add_decode(self, req: Request, victim: VictimFn) -> bool:
        """Schedule one decode token for ``req``, reserving a KV slot.

        While no block is free, ``victim(req)`` names a request to preempt; when it
        returns ``None`` (or ``req`` itself) the decode preempts itself and this
        returns ``False``. No token-budget check: callers decide that.
        """
        return self.add_decodes((req,), victim) == 1

    def add_decodes(self, reqs, victim: VictimFn) -> int:
        """``add_decode`` for each of ``reqs`` in order; returns how many were scheduled
        (the others preempted themselves)."""
        # NOTE: the hot path of every policy (once per decode per step): keep it flat. ``req.is_decode`` and
        # ``alloc.can_append()`` are inlined: ``can_append`` is "a free block exists", and the free count
        # only changes when an append takes a block or ``_make_room`` preempts. ``alloc.append`` is called
        # only when the last block is full (what it would check first).
        scheduled, cached = self.scheduled, self.cached
        add_slice, n0 = cached.append, len(cached)
        alloc = self.core.allocator
        append, tnew, slice_cls = alloc.append, tuple.__new__, CachedRequestSlice
        block_size = alloc.block_size
        num_free = alloc.num_free_blocks
        for req in reqs:
            rid = req.req_id
            computed = req.num_computed_tokens
            out = req.num_output_tokens
            if out <= 0 or req.num_prompt_tokens + out - computed != 1 or rid in scheduled:
                raise ValueError(f"{rid!r} is not an unscheduled decode")
            if not num_free:
                room = self._make_room(req, victim)
                num_free = alloc.num_free_blocks
                if not room:
                    continue
            # the table covers the ``computed`` tokens that have KV, so unless they fill whole blocks the last
            # block has room for token computed + 1 (no table lookup); else ``append`` checks and takes one
            if computed % block_size:
                added = ()
            else:
                added = append(rid, computed + 1)
                if added:
                    num_free = alloc.num_free_blocks
            # a CachedRequestSlice, positionally (tuple.__new__ skips the NamedTuple's Python-level __new__)
            add_slice(tnew(slice_cls, (rid, added, computed, 1, True, True)))
            scheduled[rid] = req
        n = len(cached) - n0  # (the others preempted themselves)
        self.num_tokens += n
        self.num_decodes += n
        return n

    def _make_room(self, req: Request, victim: VictimFn) -> bool:
        """Preempt ``victim``s until a block is free; False if ``req`` had to preempt itself."""
        alloc = self.core.allocator
        while not alloc.can_append():
            v = victim(req)
            if v is None or v is req:
                self.preempt(req)
                return False
            if v.req_id in self.scheduled:
                raise RuntimeError(f"policy chose {v.req_id!r}, already scheduled this step, as a victim")
            self.preempt(v)
        return True

    def preempt(self, req: Request) -> None:
        """Recompute preemption: free KV, reset progress, hand back to the policy."""
        self.core.preempt(req, self.now)
        self.num_preempted += 1

    def ignore(self, req: Request) -> None:
        """Drop a waiting request that can never run (too long)."""
        self.core.finish(req, RequestStatus.FINISHED_IGNORED, self.now)

    # ---- internals ----
    def _check_chunk(self, req: Request, n: int) -> None:
        if self.is_scheduled(req):
            raise ValueError(f"{req.req_id!r} scheduled twice in one step")
        if not 1 <= n <= req.num_uncomputed_tokens:
            raise ValueError(f"chunk of {n} tokens for {req.req_id!r} with {req.num_uncomputed_tokens} left")

    def _count(self, req: Request, n: int, is_decode: bool) -> None:
        self.scheduled[req.req_id] = req
        self.num_tokens += n
        if is_decode:
            self.num_decodes += 1
        else:
            self.num_prefill_tokens += n

"""Per-request executor state: built from a NewRequestSlice, then updated by deltas.

Torch-free, so ``FakeRunner`` shares the exact validation of ``ModelRunner``.

Prefix caching: a new request may start with ``num_computed_tokens > 0``; its
first ``num_computed_tokens / block_size`` blocks then already hold that KV,
written by another request, and are shared read-only. A step only ever writes
into blocks a request holds alone (the scheduler shares full blocks only), and
the checks below reject a plan that would write into a block another live
request holds.

Validation (:meth:`RequestCache.check`) reads the plan against the state *as it
will be* after the plan's releases, and raises :class:`PlanError` before any
state changes; :meth:`RequestCache.apply` then mutates. A rejected plan
therefore changes nothing, not even its releases.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice
from contract.sampling import SamplingParams
from executor_svc.runner_api import PlanError


@dataclass(slots=True)
class RequestState:
    """What the executor remembers about one request between steps."""

    req_id: str
    token_ids: list[int]  # prompt (+ outputs); grows by one per sampled token; [] in the simulator
    num_tokens: int  # == len(token_ids) when ids are carried
    sampling: SamplingParams
    block_ids: list[int] = field(default_factory=list)  # KV block table, token order
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_prompt_tokens: int = 0  # token_ids[:num_prompt_tokens] is the prompt, the rest are outputs
    # NOTE: set only for requests that use logit processors or logprobs (executor_svc/penalties.py,
    # executor_svc/logprobs.py); the runner skips all of that while RequestCache.num_with_extras is 0.
    has_extras: bool = False
    # prompt logprobs computed so far, until the first sampled token carries them; None: none to send
    # (not asked for, already sent, or a recompute that already has outputs)
    prompt_logprobs: list | None = None

    def append_token(self, token_id: int) -> None:
        if self.token_ids or self.num_tokens == 0:
            self.token_ids.append(token_id)
        self.num_tokens += 1


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """One slice of the plan resolved against the state (what the runner computes)."""

    state: RequestState
    start: int  # first token position computed now (== KV context length)
    num_new_tokens: int
    sample: bool
    is_decode: bool  # a single token at the end of the sequence (batched decode path)


class RequestCache:
    """Request id -> :class:`RequestState`, plus the checks that keep KV consistent.

    ``num_blocks`` None disables block-range checks and ``check_blocks=False``
    disables block-count checks (the simulator's plans may carry no block ids).
    """

    def __init__(
        self,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_model_len: int | None = None,
        require_token_ids: bool = True,
        check_blocks: bool = True,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.require_token_ids = require_token_ids
        self.check_blocks = check_blocks
        self._states: dict[str, RequestState] = {}
        self.num_with_extras = 0  # live states with has_extras set
        self._block_owner: dict[int, str] = {}  # NOTE: catches two live requests writing one block
        self._block_readers: dict[int, set[str]] = {}  # shared prefix blocks -> live requests reading them

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._states

    def get(self, req_id: str) -> RequestState:
        return self._states[req_id]

    def release(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            state = self._states.pop(rid, None)
            if state is not None:
                if state.has_extras:
                    self.num_with_extras -= 1
                for b in state.block_ids:
                    if self._block_owner.get(b) == rid:
                        del self._block_owner[b]
                    readers = self._block_readers.get(b)
                    if readers is not None:
                        readers.discard(rid)
                        if not readers:
                            del self._block_readers[b]

    # ---- validation -------------------------------------------------------------
    def check(self, plan: BatchPlan) -> None:
        """Raise :class:`PlanError` if ``plan`` cannot run against the current state."""
        released = set(plan.finished_ids) | set(plan.preempted_ids)
        seen: set[str] = set()
        claimed: dict[int, str] = {}  # blocks newly attached by this plan
        shared: dict[int, str] = {}  # shared prefix blocks newly read by this plan
        for s in plan.new:
            self._check_id(s.req_id, seen, plan.step_id)
            if s.req_id in self._states and s.req_id not in released:
                raise PlanError(f"step {plan.step_id}: new request {s.req_id!r} is already active "
                                "(not in finished_ids/preempted_ids)")
            self._check_new(s, plan.step_id)
            n_shared = s.num_computed_tokens // self.block_size
            self._share(s.req_id, s.block_ids[:n_shared], released, claimed, shared, plan.step_id)
            self._claim(s.req_id, s.block_ids[n_shared:], released, claimed, plan.step_id, shared)
        for c in plan.cached:
            self._check_id(c.req_id, seen, plan.step_id)
            state = self._states.get(c.req_id)
            if state is None or c.req_id in released:
                raise PlanError(f"step {plan.step_id}: cached slice for unknown request {c.req_id!r}")
            self._check_cached(c, state, plan.step_id)
            self._claim(c.req_id, c.new_block_ids, released, claimed, plan.step_id, shared)

    def _check_id(self, req_id: str, seen: set[str], step_id: int) -> None:
        if req_id in seen:
            raise PlanError(f"step {step_id}: request {req_id!r} appears twice in the plan")
        seen.add(req_id)

    def _check_new(self, s: NewRequestSlice, step_id: int) -> None:
        where = f"step {step_id}: new request {s.req_id!r}"
        if s.token_ids:
            if len(s.token_ids) != s.num_tokens:
                raise PlanError(f"{where}: num_tokens={s.num_tokens} but {len(s.token_ids)} token ids")
        elif self.require_token_ids:
            raise PlanError(f"{where}: no token ids (this runner needs them)")
        if not 0 <= s.num_prompt_tokens <= s.num_tokens:
            raise PlanError(f"{where}: num_prompt_tokens={s.num_prompt_tokens} not in [0, {s.num_tokens}]")
        c = s.num_computed_tokens
        if c < 0 or c >= max(s.num_tokens, 1) or c % self.block_size:
            raise PlanError(f"{where}: num_computed_tokens={c} must be a multiple of the block size "
                            f"{self.block_size} below num_tokens={s.num_tokens} (a cached prefix of whole blocks)")
        self._check_chunk(where, c, s.num_new_tokens, s.num_tokens, s.sample, len(s.block_ids))

    def _check_cached(self, c: CachedRequestSlice, state: RequestState, step_id: int) -> None:
        where = f"step {step_id}: request {c.req_id!r}"
        if c.num_computed_tokens != state.num_computed_tokens:
            raise PlanError(f"{where}: plan says {c.num_computed_tokens} computed tokens, "
                            f"executor has {state.num_computed_tokens}")
        if c.is_decode and c.num_new_tokens != 1:
            raise PlanError(f"{where}: decode with num_new_tokens={c.num_new_tokens}")
        num_blocks = len(state.block_ids) + len(c.new_block_ids)
        self._check_chunk(where, c.num_computed_tokens, c.num_new_tokens, state.num_tokens, c.sample, num_blocks)

    def _check_chunk(self, where: str, start: int, n: int, num_tokens: int, sample: bool, num_blocks: int) -> None:
        end = start + n
        if n < 1:
            raise PlanError(f"{where}: num_new_tokens={n} must be >= 1")
        if end > num_tokens:
            raise PlanError(f"{where}: chunk [{start}, {end}) runs past the end of its {num_tokens} tokens")
        if sample and end != num_tokens:
            raise PlanError(f"{where}: sample=True but chunk ends at {end} of {num_tokens} tokens")
        if self.max_model_len is not None and end > self.max_model_len:
            raise PlanError(f"{where}: {end} tokens exceed max_model_len={self.max_model_len}")
        if self.check_blocks and num_blocks * self.block_size < end:
            raise PlanError(f"{where}: {num_blocks} KV blocks hold {num_blocks * self.block_size} tokens, "
                            f"chunk needs {end}")

    def _claim(self, rid: str, blocks: Iterable[int], released: set[str], claimed: dict[int, str],
               step_id: int, shared: dict[int, str]) -> None:
        """``blocks`` become ``rid``'s own (it writes KV into them): no other live request may hold them."""
        for b in blocks:
            self._check_range(rid, b, step_id)
            owner = claimed.get(b) or shared.get(b)
            if owner is None:
                owner = self._block_owner.get(b)
                if owner in released:
                    owner = None
            if owner is None:
                owner = next((r for r in self._block_readers.get(b, ()) if r not in released), None)
            if owner is not None:
                raise PlanError(f"step {step_id}: request {rid!r}: block {b} already belongs to {owner!r}")
            claimed[b] = rid

    def _share(self, rid: str, blocks: Iterable[int], released: set[str], claimed: dict[int, str],
               shared: dict[int, str], step_id: int) -> None:
        """``blocks`` hold ``rid``'s cached prefix, computed by another request: read only.

        A block attached for writing in this same plan cannot hold a computed prefix.
        """
        for b in blocks:
            self._check_range(rid, b, step_id)
            if b in claimed:
                raise PlanError(f"step {step_id}: request {rid!r}: cached prefix block {b} is being "
                                f"written by {claimed[b]!r} in the same step")
            shared.setdefault(b, rid)

    def _check_range(self, rid: str, b: int, step_id: int) -> None:
        if self.num_blocks is not None and not 0 <= b < self.num_blocks:
            raise PlanError(f"step {step_id}: request {rid!r}: block id {b} out of range [0, {self.num_blocks})")

    # ---- mutation -----------------------------------------------------------------
    def apply(self, plan: BatchPlan) -> list[ScheduledChunk]:
        """Release, register new requests, append blocks; return the chunks to compute.

        Call only after :meth:`check`. Chunks come in plan order: new, then cached.
        """
        self.release(plan.finished_ids)
        self.release(plan.preempted_ids)
        chunks: list[ScheduledChunk] = []
        for s in plan.new:
            state = RequestState(s.req_id, list(s.token_ids), s.num_tokens, s.sampling, list(s.block_ids),
                                 num_computed_tokens=s.num_computed_tokens,
                                 num_prompt_tokens=s.num_prompt_tokens or s.num_tokens)
            if s.sampling.has_processors or s.sampling.wants_logprobs:
                state.has_extras = True
                self.num_with_extras += 1
                if s.sampling.prompt_logprobs is not None and state.num_prompt_tokens == s.num_tokens:
                    state.prompt_logprobs = []  # a recompute with outputs sent them with its first token
            self._states[s.req_id] = state
            n_shared = s.num_computed_tokens // self.block_size
            for b in s.block_ids[:n_shared]:
                self._block_readers.setdefault(b, set()).add(s.req_id)
            self._own(s.req_id, s.block_ids[n_shared:])
            chunks.append(ScheduledChunk(state, s.num_computed_tokens, s.num_new_tokens, s.sample,
                                         is_decode=False))
        for c in plan.cached:
            state = self._states[c.req_id]
            state.block_ids.extend(c.new_block_ids)
            self._own(c.req_id, c.new_block_ids)
            # NOTE: a 1-token chunk with context is computed on the batched decode
            # path whatever the plan calls it; attention is the same.
            is_decode = c.num_new_tokens == 1 and state.num_computed_tokens > 0
            chunks.append(ScheduledChunk(state, state.num_computed_tokens, c.num_new_tokens, c.sample, is_decode))
        return chunks

    def _own(self, rid: str, blocks: Iterable[int]) -> None:
        for b in blocks:
            self._block_owner[b] = rid

    @staticmethod
    def commit(chunks: Iterable[ScheduledChunk], sampled: dict[str, int]) -> None:
        """After the forward: advance computed counters and append sampled tokens."""
        for ch in chunks:
            ch.state.num_computed_tokens = ch.start + ch.num_new_tokens
            tok = sampled.get(ch.state.req_id)
            if tok is not None:
                ch.state.append_token(tok)

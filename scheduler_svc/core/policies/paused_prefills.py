"""Paused prefills: the bookkeeping SLAI and RAD share (SLAI's steps 0 and 2, see slai.py).

An admitted request whose prompt is only partly processed waits in ``paused``
(FIFO) for its next chunk. When KV runs out, the *most recently* paused prefill
is the victim; if none is paused, the decode needing the slot preempts itself.
"""

from __future__ import annotations

from collections import deque

from scheduler_svc.core.batch_builder import BatchBuilder
from scheduler_svc.core.policies.base import Policy
from scheduler_svc.core.request import Request


class PausedPrefillPolicy(Policy):
    """Base for policies that continue partial prefills before admitting new ones."""

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.paused: deque[Request] = deque()

    def track_served(self, served: list[Request]) -> list[Request]:
        """Step 0 for the requests a step served: those that now decode are returned (and leave
        ``paused``); the others are (kept) paused."""
        paused = self.paused
        if not paused:  # the common case, in two comprehensions (this runs once per decode per step)
            core = self.core
            if core is not None and core.last_served_prefilling == 0:  # the core counted: every one decodes
                return served
            ready = [r for r in served
                     if (out := r.num_output_tokens) > 0 and r.num_prompt_tokens + out - r.num_computed_tokens == 1]
            if len(ready) < len(served):  # (served has no duplicates: each non-decode is paused once, in order)
                paused.extend([r for r in served if not (
                    (out := r.num_output_tokens) > 0 and r.num_prompt_tokens + out - r.num_computed_tokens == 1)])
            return ready
        ready = []
        for req in served:
            out = req.num_output_tokens  # ``req.is_decode``, inlined: this runs once per decode per step
            if out > 0 and req.num_prompt_tokens + out - req.num_computed_tokens == 1:
                if paused and req in paused:
                    paused.remove(req)
                ready.append(req)
            elif req not in paused:
                paused.append(req)
        return ready

    def on_preempt(self, req: Request, now: float) -> None:
        self._forget(req)
        super().on_preempt(req, now)

    def on_remove(self, req: Request) -> None:
        self._forget(req)
        super().on_remove(req)

    def _forget(self, req: Request) -> None:
        if req in self.paused:
            self.paused.remove(req)

    def _victim(self, current: Request) -> Request | None:
        # the most recent paused prefill not already in this batch; else the decode itself
        return self.paused.pop() if self.paused else None

    def schedule_prefills(self, b: BatchBuilder, now: float) -> None:
        """Paused prefills FIFO, then admissions in queue order, within ``b.token_budget``."""
        while self.paused and b.num_tokens < b.token_budget:
            req = self.paused.popleft()
            b.add_chunk(req, min(req.num_uncomputed_tokens, b.budget_left))
        self.admit_waiting(b)

"""Sarathi-Serve stall-free batching (the paper's main baseline).

Each iteration, in arrival order:
1. every running decode gets one token, with no budget check (stall-free);
   on KV shortage the latest-arrived unscheduled running request is preempted,
   and if none is left the decode preempts itself;
2. paused prefills get ``min(remaining, budget - tokens)``;
3. new requests are admitted (FCFS, or shortest prompt first) while KV, the
   sequence cap and the budget allow.

``chunk_size`` is the token budget and is shared with decodes.
"""

from __future__ import annotations

from scheduler_svc.core.batch_builder import BatchBuilder
from scheduler_svc.core.policies.base import Policy


class SarathiPolicy(Policy):
    name = "sarathi"

    def schedule(self, b: BatchBuilder, now: float) -> None:
        victim = self.latest_arrival_victim(b)
        # running is kept in admission order, which is arrival order for these policies
        # NOTE: recompute re-admits a request later than newer arrivals; Sarathi sorts by arrival.
        running = sorted(self.core.running.values(), key=lambda r: (r.arrival_s, r.seq))
        for req in running:
            if req.is_decode and req.req_id in self.core.running and not b.is_scheduled(req):
                b.add_decode(req, victim)
        for req in running:
            if b.budget_left <= 0:
                break
            if req.is_prefill and req.req_id in self.core.running and not b.is_scheduled(req):
                b.add_chunk(req, min(req.num_uncomputed_tokens, b.budget_left))
        self.admit_waiting(b)

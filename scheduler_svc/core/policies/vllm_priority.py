"""vllm-priority: vLLM v1's scheduler with ``--scheduling-policy priority``, tier as priority.

What vLLM v1 does each step, as implemented here:

1. **Running requests first**, in the order they were admitted: each gets
   ``min(tokens left to compute, token budget left)`` tokens, so decodes take one
   token and a partial prefill continues with a chunk (chunked prefill shares one
   token budget, ``token_budget``).
2. **Preemption by priority.** When a running request needs a KV block and none
   is free, the running request with the *lowest priority, latest arrival* (the
   largest ``(priority, arrival)``) is preempted (recompute); if that is the
   request itself, it preempts itself and no more running requests are scheduled
   this step.
3. **Waiting requests** are admitted in priority order, FCFS within a priority
   (a heap on ``(priority, arrival)``; preempted requests go back into it), head
   of line, while budget, KV and the sequence cap allow; not at all in a step that
   preempted.

Priority is the tier: paying (0) before free (1), as a client would send
``priority`` per request.

Left out or changed: vLLM v1 allocates KV blocks chunk by chunk as a prompt is
computed; this core allocates a request's whole prompt at admission (so a
waiting request is admitted only when its whole prompt fits). vLLM may preempt a
request already scheduled earlier in the same step (refunding its tokens); here
only requests not yet scheduled in this step are candidates. Prefix caching,
``long_prefill_token_threshold`` and speculative decoding are not modelled. vLLM
does not preempt running requests for a *waiting* request of higher priority.
"""

from __future__ import annotations

from scheduler_svc.core.batch_builder import BatchBuilder
from scheduler_svc.core.policies.base import Policy
from scheduler_svc.core.queues import SpfQueue
from scheduler_svc.core.request import Request


def priority_key(req: Request) -> tuple:
    """vLLM's order: priority (the tier, lower first), then arrival."""
    return int(req.tier), req.arrival_s, req.seq


class PriorityQueue(SpfQueue):
    """Highest priority (lowest tier value) first, FCFS within a priority."""

    def _key(self, req: Request, order: int) -> tuple:
        return (int(req.tier), req.arrival_s, req.seq, order, req)


class VllmPriorityPolicy(Policy):
    name = "vllm-priority"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.waiting = PriorityQueue()

    def on_preempt(self, req: Request, now: float) -> None:
        self.waiting.push(req)  # back into the priority heap (its key, not the front)

    def schedule(self, b: BatchBuilder, now: float) -> None:
        running = self.core.running
        preempted = False

        def victim(current: Request) -> Request | None:
            nonlocal preempted
            preempted = True
            worst = max((r for r in running.values() if r is current or not b.is_scheduled(r)), key=priority_key)
            return None if worst is current else worst

        for req in list(running.values()):  # 1. running requests in admission order
            if b.budget_left <= 0:
                break
            if req.req_id not in running or b.is_scheduled(req):
                continue  # preempted earlier in this step
            if req.is_decode:
                if not b.add_decode(req, victim):
                    break  # it preempted itself: vLLM stops scheduling running requests
            else:
                b.add_chunk(req, min(req.num_uncomputed_tokens, b.budget_left))
        if not preempted:
            self.admit_waiting(b)  # 3. waiting requests by priority, FCFS within

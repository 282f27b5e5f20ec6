"""vLLM v0-style prefill-first scheduling (a baseline of the paper).

If the head of the (FCFS) waiting queue can be admitted, the iteration is
prefill-only: as many *whole* prompts as fit under ``max_num_batched_tokens``,
KV and the sequence cap. Otherwise it is decode-only over all running requests,
preempting the latest arrival on KV shortage. No chunking: a long prompt stalls
every decode, which is where vLLM's TBT tail comes from.
"""

from __future__ import annotations

from scheduler_svc.core.batch_builder import BatchBuilder
from scheduler_svc.core.policies.base import Policy
from scheduler_svc.core.request import Request


class VllmPrefillFirstPolicy(Policy):
    name = "vllm"

    def _fits(self, b: BatchBuilder, req: Request) -> bool:
        # can_admit first: it looks up the cached prefix, which num_uncomputed_tokens then excludes
        return (b.can_admit(req)
                and b.num_prefill_tokens + req.num_uncomputed_tokens <= self.config.max_num_batched_tokens)

    def schedule(self, b: BatchBuilder, now: float) -> None:
        while True:
            req = self.waiting.peek()
            if req is None:
                break
            if req.num_tokens > self.config.max_num_batched_tokens:
                self.waiting.pop()
                b.ignore(req)  # could never be prefilled in one step
                continue
            if not self._fits(b, req):
                break
            self.waiting.pop()
            b.admit(req, req.num_uncomputed_tokens)
        if b.scheduled:
            return  # prefill-only iteration
        victim = self.latest_arrival_victim(b)
        for req in sorted(self.core.running.values(), key=lambda r: (r.arrival_s, r.seq)):
            if req.req_id in self.core.running and req.is_decode and not b.is_scheduled(req):
                b.add_decode(req, victim)

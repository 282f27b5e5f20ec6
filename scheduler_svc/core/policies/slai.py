"""SLAI: SLO-Aware LLM Inference (Bari, Hegde, de Veciana 2025), step by step as the authors' code runs it.

Each decode carries a *last schedulable time*
``LST = last_batch_end + TBT - delta * mean_batch_time``, computed once after it
runs (delta is frozen at push time). Per iteration:

0. (``on_step_end``) requests of the last batch: unfinished prompts become
   paused prefills; finished prompts get a new LST and go on the decode heap;
1. critical decodes (``now >= LST``) in LST order, up to the decode cap;
2. paused prefills (FIFO) continue with the rest of the budget;
3. the waiting queue is kept shortest-prompt-first, paying users first
   (an incremental heap, see queues.py);
4. new prefills are admitted head-of-line while KV, the sequence cap and the
   budget allow;
5. non-critical decodes in LST order fill what is left of the budget and cap;
   those not picked keep their old LST and become critical later.

Slot reservation preempts the *most recent* paused prefill first; if there is
none, the decode preempts itself. SLAI never preempts another decode.
"""

from __future__ import annotations

from scheduler_svc.core.batch_builder import BatchBuilder
from scheduler_svc.core.policies.deadline_heap import DeadlineHeap
from scheduler_svc.core.policies.paused_prefills import PausedPrefillPolicy
from scheduler_svc.core.request import Request


class SlaiPolicy(PausedPrefillPolicy):
    name = "slai"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.decode_heap = DeadlineHeap()  # keyed by LST; ties by arrival (the authors' key)
        self.current_offset = self.config.below_memory_limit_offset

    # ---- step 0 ----
    def offset(self) -> float:
        c = self.config
        if c.fixed_offset:
            return c.below_memory_limit_offset
        used = self.core.allocator.used_fraction()
        return c.above_memory_limit_offset if used >= c.memory_limit else c.below_memory_limit_offset

    def on_step_end(self, served: list[Request], now: float) -> None:
        core = self.core
        end = core.last_batch_end_s if core.last_batch_end_s is not None else now
        mean = core.estimator.mean_s
        # delta depends only on KV use, which does not change during step 0: compute it once
        self.current_offset = self.offset()
        # at most one partial prefill exists (only the chunk that used up the budget stops short); the rest decode
        ready = self.track_served(served)
        if type(self).decode_key is not SlaiPolicy.decode_key:  # a subclass's own key (EDF)
            key = self.decode_key
            self.decode_heap.push_all(ready, lambda req: key(req, end, mean))
            return
        # NOTE: the hot path (once per decode per step): ``decode_key`` inlined, the same float operations
        # in the same order (end + tbt, minus offset x mean), so keys are bit-identical
        om = self.current_offset * mean
        dflt = self.config.default_tbt_s
        self.decode_heap.push_tbt_deadlines(ready, end, dflt, om)

    def decode_key(self, req: Request, batch_end: float, mean: float) -> float:
        """The heap key: SLAI's last schedulable time, with delta frozen at push time."""
        tbt = req.tbt_slo_s if req.tbt_slo_s is not None else self.config.default_tbt_s
        return batch_end + tbt - self.current_offset * mean

    def is_critical(self, key: float, now: float) -> bool:
        return now >= key

    # ---- bookkeeping ----
    def _forget(self, req: Request) -> None:
        self.decode_heap.discard(req)
        super()._forget(req)

    # ---- steps 1-5 ----
    def step_budget(self, now: float) -> int:
        """Token budget of this step (tau). SLAI uses the fixed configured value."""
        return self.config.token_budget

    def schedule(self, b: BatchBuilder, now: float) -> None:
        b.token_budget = self.step_budget(now)
        b.offset = self.current_offset
        b.num_critical = self.schedule_critical_decodes(b, now)  # step 1
        self.schedule_prefills(b, now)  # steps 2-4
        self.schedule_noncritical_decodes(b)  # step 5

    def schedule_critical_decodes(self, b: BatchBuilder, now: float) -> int:
        """Step 1: decodes past their LST, in LST order, up to the decode cap."""
        crit = 0
        while b.num_tokens < b.token_budget and crit < self.config.max_decodes:
            top = self.decode_heap.peek()
            if top is None or not self.is_critical(top[0], now):
                break
            req = self.decode_heap.pop()
            if b.add_decode(req, self._victim):
                crit += 1
        return crit

    def schedule_noncritical_decodes(self, b: BatchBuilder) -> None:
        """Step 5: the other decodes in LST order, with what is left of budget and cap."""
        noncrit = 0
        beta = self.config.max_decodes - b.num_critical
        pop_n, victim = self.decode_heap.pop_live_n, self._victim
        while b.num_tokens < b.token_budget and noncrit < beta:
            # as many as budget and cap allow; a decode that preempts itself makes room for another
            want = min(beta - noncrit, b.token_budget - b.num_tokens)
            batch = pop_n(want)
            if not batch:
                break
            noncrit += b.add_decodes(batch, victim)
            if len(batch) < want:
                break  # the heap has no live decode left (a self-preemption adds none): no empty pop

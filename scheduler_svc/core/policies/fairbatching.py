"""fairbatching: a FairBatching-style scheduler (Lyu, Liu, Wu, Chen, arXiv 2510.14392).

FairBatching's point is that Sarathi-style stall-free batching is unfair to
prefills: every decode runs every step although most decodes are far ahead of
their objective, while new prompts queue. Implemented here:

1. **Adaptive batch capacity.** The step budget is set by time, not a fixed token
   count: the largest step whose predicted time fits ``tile_slack_fraction`` of
   the tightest decode slack, between ``min_token_budget`` and
   ``max_token_budget`` (``slack_steps.py``). Slack grows -> a bigger prefill
   burst; a decode near its deadline -> a small step.
2. **Fair batch formation.** Decodes are no longer served first by rule. A decode
   is *due* when it cannot wait for the next step (its deadline comes before the
   end of two predicted steps of this size); due decodes run first, in deadline
   order. Then prefills take the budget: paused chunks first, then new requests
   by TTFT deadline (arrival + TTFT objective; FCFS when all objectives are
   equal). Decodes with slack to spare only fill what the prefills leave, so
   compute is reclaimed from decodes ahead of their objective for prefill surges.
3. KV shortage preempts the most recently paused prefill, else the decode itself
   (as SLAI does; FairBatching builds on vLLM, whose victim is the latest arrival).

Left out or changed: the paper tracks slack on an *envelope* (the j-th token is
due at arrival + TTFT SLO + j x TPOT SLO), so a request ahead of its envelope may
skip many steps; this project's objective is the P99 of each gap between tokens
(the capacity criterion, docs/results.md), so a decode's next token is due one TBT objective after its
last one instead. The paper's load estimator for a cluster router and its
profiled (offline) batch-time model are not implemented: the step-time model is
the online fit that slai-adaptive uses.
"""

from __future__ import annotations

from scheduler_svc.core.batch_builder import BatchBuilder
from scheduler_svc.core.policies.paused_prefills import PausedPrefillPolicy
from scheduler_svc.core.policies.slack_steps import SlackSizedSteps, next_token_deadline
from scheduler_svc.core.queues import SpfQueue
from scheduler_svc.core.request import Request


class TtftDeadlineQueue(SpfQueue):
    """Earliest TTFT deadline (arrival + TTFT objective) first; preempted requests first."""

    def __init__(self, default_ttft_s: float) -> None:
        super().__init__(user_priority=False)
        self._default_ttft_s = default_ttft_s

    def _key(self, req: Request, order: int) -> tuple:
        ttft = req.ttft_slo_s if req.ttft_slo_s is not None else self._default_ttft_s
        return (order >= 0, req.arrival_s + ttft, order, req)


class FairBatchingPolicy(PausedPrefillPolicy):
    name = "fairbatching"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.waiting = TtftDeadlineQueue(self.config.default_ttft_s)
        self.steps = SlackSizedSteps(self.config)
        self.num_deferred = 0  # decodes left out of the last step (telemetry, tests)

    def on_step_end(self, served: list[Request], now: float) -> None:
        core = self.core
        self.steps.observe(core.last_step_tokens, core.last_step_s)
        self.track_served(served)

    def schedule(self, b: BatchBuilder, now: float) -> None:
        core, tbt = self.core, self.config.default_tbt_s
        decodes = sorted(((next_token_deadline(r, tbt, now), r.seq, r) for r in core.running.values()
                          if r.is_decode), key=lambda e: (e[0], e[1]))
        b.token_budget = self.steps.budget(decodes[0][0] - now if decodes else None)
        horizon = now + 2 * self.steps.predict_s(b.token_budget, core.estimator.mean_s)
        deferred = []
        due = 0
        for deadline, _, req in decodes:  # 1. due decodes, earliest deadline first
            if deadline <= horizon and due < self.config.max_decodes:
                if req.req_id in core.running and b.add_decode(req, self._victim):
                    due += 1
            else:
                deferred.append(req)
        b.num_critical = due
        self.schedule_prefills(b, now)  # 2. paused chunks, then new requests by TTFT deadline
        left = self.config.max_decodes - due
        for req in deferred:  # 3. decodes with slack fill what is left
            if b.num_tokens >= b.token_budget or left <= 0:
                break
            if req.req_id in core.running and b.add_decode(req, self._victim):
                left -= 1
        self.num_deferred = sum(1 for r in deferred if not b.is_scheduled(r))

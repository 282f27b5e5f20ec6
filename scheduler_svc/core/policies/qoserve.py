"""qoserve: a QoServe/Niyama-style scheduler (Goel, Mohan, Kwatra, Anupindi, Ramjee, arXiv 2503.22562).

Niyama co-schedules requests of several QoS classes on one replica with three
mechanisms, all implemented here:

1. **Dynamic chunking.** Every decode runs every step (stall-free, as in
   Sarathi-Serve), and the prefill chunk is sized so the whole step's predicted
   time fits ``tile_slack_fraction`` of the tightest decode slack, between
   ``min_token_budget`` and ``max_token_budget`` (``slack_steps.py``): large
   chunks while decodes have slack, small ones when a decode is near its deadline.
2. **Hybrid prioritization.** Prefills (paused and new) are ordered by
   ``TTFT deadline + hybrid_alpha x predicted prefill time of the remaining
   prompt``: alpha = 0 is EDF on TTFT deadlines (fair), a large alpha tends to
   shortest-remaining-prefill-first (efficient); paying requests first.
3. **Selective (eager) relegation.** Each step the main queue is walked in
   priority order, accumulating the predicted prefill time of everything ahead
   at the current prefill rate (the step's prefill tokens over its predicted
   time). A free-tier request predicted to miss its TTFT objective is relegated
   at once to a best-effort queue that is admitted from only when the main queue
   is empty, so a surge degrades the relegated few instead of every request.
   Paying requests and requests that already have output tokens (preempted) are
   never relegated. ``--set relegation=false`` disables it.

KV shortage preempts the most recently paused prefill, else the decode itself.

Left out or changed: Niyama's per-class QoS (arbitrary TTFT/TPOT classes and
deadline-based decode scheduling) is reduced to this project's two tiers and
their TBT objectives; its offline-profiled batch-time predictor is replaced by
the online step-time fit; the value of alpha in the paper is not known to us
(default 1.0); relegated requests are never promoted back.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterator

from contract.tiers import Tier
from scheduler_svc.core.batch_builder import BatchBuilder
from scheduler_svc.core.policies.paused_prefills import PausedPrefillPolicy
from scheduler_svc.core.policies.slack_steps import SlackSizedSteps, next_token_deadline
from scheduler_svc.core.request import Request


class HybridQueue:
    """The main queue (sorted by hybrid key) and the relegated queue (FIFO).

    Implements ``queues.WaitingQueue``; ``peek``/``pop`` serve the main queue first.
    """

    def __init__(self, policy: QoServePolicy) -> None:
        self._policy = policy
        self.main: list[tuple] = []  # sorted (tier, key, order, req)
        self.relegated: deque[Request] = deque()
        self._order = itertools.count()
        self._front = itertools.count(-1, -1)
        self.num_relegated = 0  # requests relegated so far (telemetry, tests)

    def _insert(self, req: Request, order: int, front: bool) -> None:
        tier = int(req.tier) if self._policy.config.user_priority else 0
        key = float("-inf") if front else self._policy.hybrid_key(req, req.num_tokens)
        bisect.insort(self.main, (tier, key, order, req))

    def push(self, req: Request) -> None:
        self._insert(req, next(self._order), front=False)

    def push_front(self, req: Request) -> None:
        self._insert(req, next(self._front), front=True)

    def relegate_at(self, i: int) -> None:
        req = self.main.pop(i)[-1]
        self.relegated.append(req)
        self.num_relegated += 1

    def peek(self) -> Request | None:
        if self.main:
            return self.main[0][-1]
        return self.relegated[0] if self.relegated else None

    def pop(self) -> Request:
        return self.main.pop(0)[-1] if self.main else self.relegated.popleft()

    def discard(self, req: Request) -> None:
        for i, e in enumerate(self.main):
            if e[-1] is req:
                del self.main[i]
                return
        if req in self.relegated:
            self.relegated.remove(req)

    def __len__(self) -> int:
        return len(self.main) + len(self.relegated)

    def __iter__(self) -> Iterator[Request]:
        return itertools.chain((e[-1] for e in self.main), self.relegated)


class QoServePolicy(PausedPrefillPolicy):
    name = "qoserve"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.waiting = HybridQueue(self)
        self.steps = SlackSizedSteps(self.config)

    # ---- priorities ----
    def prefill_time_s(self, tokens: int) -> float:
        """Predicted time to prefill ``tokens`` tokens at full steps."""
        m = self.steps.model
        if m.ready:
            return tokens * m.b
        mean = self.core.estimator.mean_s if self.core is not None else 0.0
        return tokens * mean / self.config.token_budget

    def ttft_deadline(self, req: Request) -> float:
        ttft = req.ttft_slo_s if req.ttft_slo_s is not None else self.config.default_ttft_s
        return req.arrival_s + ttft

    def hybrid_key(self, req: Request, remaining: int) -> float:
        return self.ttft_deadline(req) + self.config.hybrid_alpha * self.prefill_time_s(remaining)

    def _paused_key(self, req: Request) -> tuple:
        tier = int(req.tier) if self.config.user_priority else 0
        return tier, self.hybrid_key(req, req.num_uncomputed_tokens)

    # ---- notifications ----
    def on_step_end(self, served: list[Request], now: float) -> None:
        core = self.core
        self.steps.observe(core.last_step_tokens, core.last_step_s)
        self.track_served(served)

    # ---- the decision ----
    def schedule(self, b: BatchBuilder, now: float) -> None:
        core, tbt = self.core, self.config.default_tbt_s
        decodes = [r for r in core.running.values() if r.is_decode]
        slack = min((next_token_deadline(r, tbt, now) for r in decodes), default=None)
        b.token_budget = max(self.steps.budget(None if slack is None else slack - now), len(decodes))
        n = 0
        for req in sorted(decodes, key=lambda r: (r.tier, r.arrival_s, r.seq)):  # 1. every decode
            if n >= self.config.max_decodes:
                break
            if req.req_id in core.running and b.add_decode(req, self._victim):
                n += 1
        if self.config.relegation:
            self.relegate(now, b.token_budget - b.num_tokens, b.token_budget)
        self.schedule_prefills(b, now)  # 2. prefills by hybrid priority in the rest of the step

    def relegate(self, now: float, prefill_tokens_per_step: int, step_tokens: int) -> None:
        """Relegate the free-tier requests of the main queue predicted to miss their TTFT objective."""
        q = self.waiting
        step_s = self.steps.predict_s(step_tokens, self.core.estimator.mean_s)
        if prefill_tokens_per_step <= 0 or step_s <= 0:
            return
        rate = prefill_tokens_per_step / step_s  # prefill tokens per second at this step size
        ahead = sum(r.num_uncomputed_tokens for r in self.paused)
        i = 0
        while i < len(q.main):
            req = q.main[i][-1]
            ahead += req.num_uncomputed_tokens
            if (req.tier == Tier.FREE and req.first_token_s is None and req.num_output_tokens == 0
                    and now + ahead / rate > self.ttft_deadline(req)):
                ahead -= req.num_uncomputed_tokens
                q.relegate_at(i)
            else:
                i += 1

    def schedule_prefills(self, b: BatchBuilder, now: float) -> None:
        """Paused prefills and the queue head compete on the hybrid key; the relegated queue
        is reached only when the main queue is empty."""
        q = self.waiting
        while b.num_tokens < b.token_budget:
            paused = min(self.paused, key=self._paused_key, default=None)
            head = q.main[0][-1] if q.main else None
            take_new = head is not None and (paused is None or q.main[0][:2] < self._paused_key(paused))
            if take_new and not b.can_admit(head):
                take_new = False
                if paused is None:
                    return  # head of line: the main queue's head waits for KV
            if take_new:
                q.pop()
                b.admit(head, min(head.num_uncomputed_tokens, b.budget_left))
            elif paused is not None:
                self.paused.remove(paused)
                b.add_chunk(paused, min(paused.num_uncomputed_tokens, b.budget_left))
            elif q.relegated and b.can_admit(q.relegated[0]):
                req = q.pop()
                b.admit(req, min(req.num_uncomputed_tokens, b.budget_left))
            else:
                return

"""slai-adaptive: SLAI with KV-aware, slack-sized steps and aging shortest-prompt-first.

Why it works. In the paper's cost model (step time depends only on its token
count) capacity is set by two resources, and near capacity the binding one is
the **KV pool**, not the step budget. A decoding request holds ``P + k`` tokens
of KV and produces one token per step it is served, so by Little's law the KV
in use is about ``lambda x E[(P + D/2) D] x T_token`` (1.18e6 token-tokens on
the paper's trace), where ``T_token`` is the time between a request's tokens.
With the 235,728-token pool that caps ``T_token`` at ~61 ms at 3.07 QPS.
Throughput wants bigger steps, KV wants shorter time between tokens; the two
meet at ~550-token steps, so the stability bound with KV counted is ~3.3 QPS,
barely above the 512-token bound. Without a KV-aware step the pool ran full
(KV > 95% in 95-98% of steps at 3.0 QPS), the queue head stopped fitting and
steps fell to decodes only; with it, capacity on the paper's trace rose from
2.888 to 3.231 QPS at 16,384 requests per trial (docs/results.md). Every
mechanism below serves that balance.

1. **Slack-sized steps, capped by KV use.** Each step takes the largest budget
   whose *predicted* time fits ``tile_slack_fraction`` of the tightest decode
   slack (previous token time + TBT - now), between ``token_budget`` and
   ``max_token_budget``. Big steps amortise the fixed per-step cost and
   prefill faster while memory is plentiful. The prediction is an online
   least-squares fit of measured step times over the step's composition
   (``step_fit.py``): prefill tokens, decodes, the decodes' summed KV context,
   and whether it mixes prefill and decode. All four are known when the step
   is sized (every ready decode rides in it), so the budget is the decodes plus
   the largest prefill whose predicted step fits. On a GPU a decode costs more
   than a prefill token (per-sequence work, reading its whole KV context) and
   mixing has a price; a fit on the token count alone averaged those costs
   away and, under the GPU-shaped cost model (docs/results.md), predicted steps
   17 ms short on average (48 ms at worst) exactly when long-context decodes
   were running, so steps overran the paying TBT and that objective bound
   capacity. Learned from measured timings, never from the simulator's cost
   model, the same fit serves the live executor. The budget is
   then capped by KV use: ``max_token_budget`` up to ``kv_step_low`` of the
   pool, falling linearly to ``kv_min_token_budget`` at ``kv_step_high``.
   Shorter steps shorten every request's time between tokens, which is what
   frees KV, so the pool settles below full instead of stalling admissions
   (a full pool leaves steps with only decodes: 4 tokens/ms instead of 9.5).
   **Small steps.** ``token_budget`` (the paper's tau) is the floor: on the
   paper's GPU a tau-token step (53 ms) fits every TBT objective. Where it does
   not (a CPU runs a 512-token step in ~0.9 s against a 0.3 s paying TBT),
   ``min_prefill_chunk`` > 0 lets the step shrink to the ready decodes plus the
   prefill the slack allows, at least ``min_prefill_chunk`` tokens so prompts
   keep moving, and the prefill may not take the decodes' share of the step.
   The scheduler service turns it on for executors that run a model on a CPU
   (``-1``, auto); the simulator's default keeps tau as the floor.
2. **No decode deferral when memory is tight.** At or above ``memory_limit``
   KV use (0.8 for this variant) every decode is critical: all run every
   step, as in Sarathi. A deferred decode keeps its KV for more wall time
   without producing anything, and in this cost model a decode token costs
   what a prefill token costs, so deferral buys no throughput there. Below the
   limit SLAI's last-schedulable-time deferral is kept (it gives prefills the
   room and lowers TTFT a little at moderate load).
3. **Shortest remaining prefill first, with aging.** SLAI always continues the
   paused prefill before admitting anyone, so a 7,000-token prompt that got its
   first chunk holds up every short prompt for ~14 steps. Here the paused
   prefills and the head of the waiting queue compete on one key, remaining
   prompt tokens (SRPT, the order that minimises mean response time), paying
   users first. Aging (``queues.AgingSpfQueue``) subtracts
   ``aging_tokens_per_s`` tokens per second waited from every key, so a long
   prompt is overtaken only by requests arriving within
   ``length / aging_tokens_per_s`` seconds after it: its TTFT stays bounded,
   where plain SPF can starve it near capacity. Several partial prefills can
   exist; the victim on KV shortage is still the most recently paused one.
4. **TTFT objectives jump the order when they come due.** A request that carries
   a TTFT objective (``Request.ttft_slo_s``: the API key's tier in the gateway's
   key file, or ``--paying-ttft`` / ``--free-ttft`` in the simulator) becomes
   *urgent* once it has waited ``ttft_urgent_fraction`` of it without a first
   token. Urgent requests, waiting or paused, are prefilled before the rest of
   their tier and of lower tiers (paying first still holds), earliest TTFT
   deadline first (EDF among the few that need it); SRPT with aging orders the
   rest. Aging bounds every wait, but only in tokens per
   second; a tier's own objective needs a deadline, and SRPT alone would let a
   long paying prompt miss a 1 s objective behind a stream of short free ones.
   Requests without an objective (the paper's workload) never become urgent,
   so their plans are unchanged (docs/scheduler.md, "TTFT objectives").

Everything else (LST heap, critical / non-critical decodes, victim order) is SLAI's.
"""

from __future__ import annotations

import heapq

from scheduler_svc.core.batch_builder import BatchBuilder
from scheduler_svc.core.policies.slai import SlaiPolicy
from scheduler_svc.core.queues import AgingSpfQueue
from scheduler_svc.core.request import Request, RequestStatus
from scheduler_svc.core.step_fit import OnlineStepFit, StepShape


class SlaiAdaptivePolicy(SlaiPolicy):
    name = "slai-adaptive"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.waiting = AgingSpfQueue(self.config.user_priority, self.config.aging_tokens_per_s)
        self.step_model = OnlineStepFit()
        self._observed_step = -1  # step_id of the last measured plan fed to step_model
        self.last_budget = self.config.token_budget
        self.prefill_cap: int | None = None  # this step's prefill tokens, when min_prefill_chunk sizes it
        self.kv_used = 0.0  # KV use when the current step was scheduled
        self.serve_all_decodes = False  # KV at or above memory_limit: no decode is deferred
        # requests with a TTFT objective and no first token yet: (urgent from, seq, req) until they come
        # due, then in ``urgent`` (point 4 of the module docstring)
        self._ttft_pending: list[tuple[float, int, Request]] = []
        self.urgent: list[Request] = []

    def on_arrival(self, req: Request, now: float) -> None:
        super().on_arrival(req, now)
        if req.ttft_slo_s is not None and req.first_token_s is None:
            due = req.arrival_s + self.config.ttft_urgent_fraction * req.ttft_slo_s
            heapq.heappush(self._ttft_pending, (due, req.seq, req))

    def most_urgent(self, b: BatchBuilder, now: float) -> Request | None:
        """The urgent request with the earliest TTFT deadline that waits or is paused (None: none)."""
        pending, urgent = self._ttft_pending, self.urgent
        while pending and pending[0][0] <= now:
            urgent.append(heapq.heappop(pending)[2])
        if not urgent:
            return None
        urgent[:] = [r for r in urgent if r.first_token_s is None and not r.is_finished]
        best = None
        for r in urgent:
            if b.is_scheduled(r) or (r.status == RequestStatus.RUNNING and r not in self.paused):
                continue  # in this step already, or its chunk is in flight
            if best is None or r.arrival_s + r.ttft_slo_s < best.arrival_s + best.ttft_slo_s:
                best = r
        return best

    def on_step_end(self, served: list[Request], now: float) -> None:
        core = self.core
        plan = core.last_step_plan
        if plan is not None and plan.step_id != self._observed_step:
            # each measured step once (scheduling ahead calls this before the step's result)
            self._observed_step = plan.step_id
            ctx = 0
            for s in plan.cached:
                if s.is_decode:
                    ctx += s.num_computed_tokens
            st = plan.stats
            self.step_model.observe(StepShape(st.num_prefill_tokens, st.num_decodes, ctx), core.last_step_s)
        super().on_step_end(served, now)

    def schedule(self, b: BatchBuilder, now: float) -> None:
        self.kv_used = self.core.allocator.used_fraction()
        self.serve_all_decodes = self.kv_used >= self.config.memory_limit
        super().schedule(b, now)

    def is_critical(self, key: float, now: float) -> bool:
        return self.serve_all_decodes or now >= key

    def tightest_slack(self, now: float) -> float | None:
        """Seconds until the earliest deadline of a decode-ready request, or None."""
        return self.decode_load(now)[0]

    def decode_load(self, now: float) -> tuple[float | None, int, int]:
        """(tightest slack or None, decode-ready requests, their summed KV context):
        what the next step's decodes will cost, for sizing its prefill."""
        best = None
        decodes = ctx = 0
        for req in self.core.running.values():
            if req.is_decode:
                decodes += 1
                ctx += req.num_computed_tokens
                if req.last_token_s is not None:
                    slack = req.last_token_s + self.tbt_of(req) - now
                    if best is None or slack < best:
                        best = slack
        return best, decodes, ctx

    def _key(self, req: Request, tokens: int) -> tuple[int, float]:
        tier = int(req.tier) if self.config.user_priority else 0
        return tier, tokens + self.config.aging_tokens_per_s * req.arrival_s

    def _schedule_prefills(self, b: BatchBuilder, now: float) -> None:
        """Urgent TTFT objectives first (earliest deadline), then paused prefills and new admissions by
        shortest remaining prompt (aged)."""
        check_urgent = bool(self._ttft_pending or self.urgent)
        while b.num_tokens < b.token_budget:
            paused = min(self.paused, key=lambda r: self._key(r, r.num_uncomputed_tokens), default=None)
            head = self.waiting.peek()
            urgent = self.most_urgent(b, now) if check_urgent else None
            if urgent is not None and self._tier_allows(urgent, paused, head):
                if urgent.status == RequestStatus.RUNNING:  # paused
                    self.paused.remove(urgent)
                    b.add_chunk(urgent, min(urgent.num_uncomputed_tokens, b.budget_left))
                    continue
                if b.can_admit(urgent):
                    self.waiting.discard(urgent)
                    b.admit(urgent, min(urgent.num_uncomputed_tokens, b.budget_left))
                    continue
                check_urgent = False  # it does not fit now: the usual order for the rest of this step
            take_new = head is not None and b.can_admit(head) and (  # can_admit: cached prefix looked up
                paused is None
                or self._key(head, head.num_uncomputed_tokens) < self._key(paused, paused.num_uncomputed_tokens))
            if take_new:
                self.waiting.pop()
                b.admit(head, min(head.num_uncomputed_tokens, b.budget_left))
            elif paused is not None:
                self.paused.remove(paused)
                b.add_chunk(paused, min(paused.num_uncomputed_tokens, b.budget_left))
            else:
                return

    def _tier_allows(self, urgent: Request, *others: Request | None) -> bool:
        """With user priority an urgent request jumps only its own and lower tiers: a free request's
        objective never delays a paying prompt that is next in the usual order."""
        if not self.config.user_priority:
            return True
        return all(r is None or int(urgent.tier) <= int(r.tier) for r in others)

    def kv_budget_cap(self, kv_used: float) -> int:
        """The largest step KV use allows: ``max_token_budget`` up to ``kv_step_low``,
        falling linearly to ``kv_min_token_budget`` at ``kv_step_high`` and above."""
        c = self.config
        hi = max(c.token_budget, c.max_token_budget)
        lo = min(c.kv_min_token_budget, hi)
        frac = (kv_used - c.kv_step_low) / (c.kv_step_high - c.kv_step_low)
        frac = min(1.0, max(0.0, frac))
        return int(round(hi - (hi - lo) * frac))

    def step_budget(self, now: float) -> int:
        c = self.config
        lo, hi = c.token_budget, max(c.token_budget, c.max_token_budget)
        self.prefill_cap = None
        if not self.step_model.ready:
            budget = lo
        else:
            slack, decodes, ctx = self.decode_load(now)
            if slack is None:
                budget = hi
            else:
                # the step carries (about) every ready decode: their count and context cost time too
                prefill = self.step_model.max_prefill_within(c.tile_slack_fraction * slack, decodes, ctx)
                if c.min_prefill_chunk > 0:
                    # below tau when the slack needs it (point 1 of the module docstring, "Small steps")
                    prefill = max(prefill, c.min_prefill_chunk)
                    self.prefill_cap = prefill
                    lo = 1
                budget = decodes + prefill if prefill > 0 else 0
            budget = min(hi, max(lo, budget))
        budget = min(budget, self.kv_budget_cap(self.kv_used))
        self.last_budget = budget
        return budget

    def schedule_prefills(self, b: BatchBuilder, now: float) -> None:
        cap = self.prefill_cap
        if cap is None:
            self._schedule_prefills(b, now)
            return
        # a step sized for every ready decode plus ``cap`` prefill tokens: the prefill may not take the
        # non-critical decodes' share of the budget, or the step outlasts the slack it was sized for
        budget = b.token_budget
        b.token_budget = min(budget, b.num_tokens + cap)
        try:
            self._schedule_prefills(b, now)
        finally:
            b.token_budget = budget

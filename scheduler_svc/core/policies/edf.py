"""EDF: a strong deadline-aware baseline beside the paper's policies.

Same skeleton as SLAI (due decodes, paused prefills, new prefills, the other
decodes), but each decode's key is its *own* deadline, the time its previous
token was produced plus its TBT objective, not the batch end minus an offset.
A decode is due when ``deadline - now <= lookahead x T_step`` (default 2: if it
waits through this step it must still fit in the next one), where ``T_step`` is
a slowly decaying maximum of measured step times: the *mean* step is much
shorter than a full-budget step when decode-only steps are frequent, and a
deadline test on the mean misses deadlines whenever a full step follows.
There is no memory-dependent offset.

Prefill order (``edf_prefill_order``): ``spf`` (shortest first, paying first, the
default), ``fcfs``, or ``laxity``: least TTFT laxity first, where laxity =
arrival + TTFT objective - (prefill steps left x mean batch time).
"""

from __future__ import annotations

from scheduler_svc.core.policies.slai import SlaiPolicy
from scheduler_svc.core.queues import FcfsQueue, SpfQueue
from scheduler_svc.core.request import Request


class LaxityQueue(SpfQueue):
    """Least TTFT laxity first; the key is fixed when a request is (re)queued."""

    def __init__(self, policy: EdfPolicy) -> None:
        super().__init__(user_priority=False)
        self._policy = policy

    def _key(self, req: Request, order: int) -> tuple:
        p = self._policy
        steps = -(-req.num_uncomputed_tokens // p.config.token_budget)  # a cached prefix costs no step
        ttft = req.ttft_slo_s if req.ttft_slo_s is not None else p.config.default_ttft_s
        mean = p.core.estimator.mean_s if p.core is not None else 0.0
        return (req.arrival_s + ttft - steps * mean, order, req)

    def push_front(self, req: Request) -> None:
        self.push(req)  # a preempted request's laxity already reflects its age


class EdfPolicy(SlaiPolicy):
    name = "edf"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        order = self.config.edf_prefill_order
        if order == "laxity":
            self.waiting = LaxityQueue(self)
        elif order == "fcfs":
            self.waiting = FcfsQueue()
        else:
            self.waiting = SpfQueue(user_priority=self.config.user_priority)
        self.current_offset = 0.0
        self.step_ref_s = 0.0  # decaying max of step durations

    def on_step_end(self, served: list[Request], now: float) -> None:
        self.step_ref_s = max(self.core.last_step_s, 0.999 * self.step_ref_s)
        super().on_step_end(served, now)

    def decode_key(self, req: Request, batch_end: float, mean: float) -> float:
        last = req.last_token_s if req.last_token_s is not None else batch_end
        return last + self.tbt_of(req)

    def is_critical(self, key: float, now: float) -> bool:
        return key - now <= self.config.edf_lookahead * max(self.step_ref_s, self.core.estimator.mean_s)

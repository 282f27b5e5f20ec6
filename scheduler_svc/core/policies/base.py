"""The policy interface: what a scheduling strategy decides, and when it is told things."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from scheduler_svc.core.config import SchedulerConfig
from scheduler_svc.core.queues import WaitingQueue, make_waiting_queue
from scheduler_svc.core.request import Request

if TYPE_CHECKING:
    from scheduler_svc.core.batch_builder import BatchBuilder
    from scheduler_svc.core.view import CoreView


class Policy(ABC):
    """A scheduling strategy. It owns the waiting queue and any private state.

    The core calls, in this order over a request's life: ``on_arrival`` once;
    ``schedule`` every step (the policy pops from its queue and calls the
    builder); ``on_step_end`` with the requests served by each step that are
    still unfinished; ``on_preempt`` when a request loses its KV (the policy
    re-queues it); ``on_remove`` when it finishes or is aborted.
    """

    name = "base"

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.waiting: WaitingQueue = make_waiting_queue(self.config.fcfs, self.config.user_priority)
        self.core: CoreView | None = None

    def bind(self, core: CoreView) -> None:
        if self.core is not None and self.core is not core:
            raise RuntimeError(f"policy {self.name!r} is already bound to another core")
        self.core = core

    # ---- notifications ----
    def on_arrival(self, req: Request, now: float) -> None:
        self.waiting.push(req)

    def on_preempt(self, req: Request, now: float) -> None:
        self.waiting.push_front(req)

    def on_remove(self, req: Request) -> None:
        self.waiting.discard(req)

    def on_step_end(self, served: list[Request], now: float) -> None:
        """``served``: requests in the finished step that are still unfinished, in plan order.

        Each either decodes now (``req.is_decode``) or still has prompt left; the core's
        ``last_served_prefilling`` says how many do the latter (None when it did not count them).
        """

    # ---- the decision ----
    @abstractmethod
    def schedule(self, b: BatchBuilder, now: float) -> None:
        """Fill ``b`` with this iteration's work."""

    # ---- helpers shared by several policies ----
    def tbt_of(self, req: Request) -> float:
        return req.tbt_slo_s if req.tbt_slo_s is not None else self.config.default_tbt_s

    def admit_waiting(self, b: BatchBuilder) -> None:
        """Admit from the head of the waiting queue while budget, KV and seqs allow.

        Head-of-line: stops at the first request that does not fit (as the authors'
        code does), so an order (FCFS or SPF) is never overtaken.
        """
        waiting = self.waiting
        while b.token_budget > b.num_tokens:  # b.budget_left > 0 (once per step: no property call)
            req = waiting.peek()
            if req is None or not b.can_admit(req):
                return
            waiting.pop()
            b.admit(req, min(req.num_uncomputed_tokens, b.budget_left))

    def latest_arrival_victim(self, b: BatchBuilder):
        """Victim rule of FCFS-style policies: the latest-arrived unscheduled running request."""
        core = self.core

        def victim(current: Request) -> Request | None:
            best = None
            for req in core.running.values():
                if req is current or b.is_scheduled(req):
                    continue
                if best is None or (req.arrival_s, req.seq) > (best.arrival_s, best.seq):
                    best = req
            return best

        return victim

"""The contract between the core's mechanism and its policies: what a policy (and the
batch builder it fills) may read and do on the core.

``SchedulerCore`` satisfies these protocols structurally; policies and ``BatchBuilder``
depend on them, never on ``SchedulerCore`` itself, so the mechanism can change without
a policy noticing, and the modules import each other in one direction only:
``scheduler -> batch_builder -> view`` and ``scheduler -> policies -> view``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from contract.plan import BatchPlan
from scheduler_svc.core.config import SchedulerConfig
from scheduler_svc.core.request import Request, RequestStatus


class KvView(Protocol):
    """The KV block pool as the batch builder and the policies see it."""

    def used_fraction(self) -> float:
        """Share of blocks in use, 0..1 (SLAI's and slai-adaptive's memory signal)."""
        ...

    def can_allocate(self, num_tokens: int) -> bool:
        """Blocks for ``num_tokens`` fit while leaving the watermark free."""
        ...

    def can_append(self) -> bool:
        """At least one block is free (a decode crossing a block boundary needs one)."""
        ...

    def allocate(self, req_id: str, num_tokens: int) -> list[int]:
        """Blocks for a request's first ``num_tokens`` tokens (its whole prompt at admission)."""
        ...

    def append(self, req_id: str, num_tokens_after: int) -> tuple[int, ...]:
        """Grow a request's blocks to hold ``num_tokens_after`` tokens; returns the new block ids."""
        ...


class PrefixCacheView(Protocol):
    """The prefix-caching side of the block pool (``core/prefix_cache.py``), used by the batch builder."""

    @property
    def block_size(self) -> int:
        ...

    def can_allocate_with(self, num_tokens: int, hits: list[int]) -> bool:
        """``can_allocate`` for a request whose first ``len(hits)`` blocks are the cached ``hits``."""
        ...

    def allocate_with(self, req_id: str, num_tokens: int, hits: list[int]) -> list[int]:
        """References on ``hits``, then fresh blocks up to ``num_tokens`` tokens; the whole table."""
        ...

    def register(self, req: Request, num_computed_after: int) -> None:
        """Offer the blocks full once ``num_computed_after`` tokens have KV (visible from the next plan)."""
        ...

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admission's lookup (the hit-rate metrics)."""
        ...


class StepTimes(Protocol):
    """The closed-loop estimate of a step's duration (SLAI's mean batch time)."""

    @property
    def mean_s(self) -> float:
        ...


class CoreView(Protocol):
    """What the core shows a policy and the batch builder of one ``schedule`` call."""

    @property
    def config(self) -> SchedulerConfig:
        """The scheduler's settings (budget, SLO defaults, policy knobs)."""
        ...

    @property
    def running(self) -> Mapping[str, Request]:
        """Requests holding KV, in admission order."""
        ...

    @property
    def allocator(self) -> KvView:
        ...

    @property
    def estimator(self) -> StepTimes:
        ...

    @property
    def prefix_cache(self) -> PrefixCacheView | None:
        """The block pool's prefix cache; None when prefix caching is off."""
        ...

    def match_prefix(self, req: Request) -> list[int]:
        """Look up a waiting request's cached prefix (prefix caching on); sets its
        ``num_computed_tokens`` to the cached length; returns the blocks holding it."""
        ...

    @property
    def last_batch_end_s(self) -> float | None:
        """When the last non-empty step ended (scheduler clock); None before the first."""
        ...

    @property
    def last_step_s(self) -> float:
        """Duration of the last non-empty step."""
        ...

    @property
    def last_step_tokens(self) -> int:
        """Tokens (prefill + decode) in that step."""
        ...

    @property
    def last_step_plan(self) -> BatchPlan | None:
        """The plan of that step (its slices give its composition); None before the first."""
        ...

    @property
    def last_served_prefilling(self) -> int | None:
        """Of the requests just passed to ``on_step_end``, how many still have prompt left (the
        others decode); None when the core did not count them."""
        ...

    @property
    def num_waiting_tokens(self) -> int:
        """Uncomputed prompt tokens of waiting requests (a cached prefix counts as computed)."""
        ...

    def on_admitted(self, req: Request, now: float) -> None:
        """``req`` got its KV blocks in this step (the builder calls this)."""
        ...

    def preempt(self, req: Request, now: float) -> None:
        """Recompute preemption: free ``req``'s KV, reset its progress, hand it back to the policy."""
        ...

    def finish(self, req: Request, status: RequestStatus, now: float, record: bool = True) -> None:
        """End ``req`` with ``status`` (the builder uses it to drop requests that can never run)."""
        ...

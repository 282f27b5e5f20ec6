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
    def num_waiting_tokens(self) -> int:
        """Prompt tokens of waiting requests."""
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

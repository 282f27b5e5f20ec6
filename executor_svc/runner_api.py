"""The runner interface the executor service drives (no torch import here).

The gRPC layer and the simulator import this module, ``FakeRunner`` and the
plan types only; ``ModelRunner`` (torch) is imported lazily where it is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from contract.executor_info import ExecutorInfo
from contract.plan import BatchPlan, StepResult


class PlanError(ValueError):
    """The plan contradicts the runner's state or resources.

    Raised before anything is written: KV memory and per-request state are
    exactly as they were before ``execute`` was called (maps to INVALID_ARGUMENT).
    """


@runtime_checkable
class Runner(Protocol):
    """Runs exactly the plan it is sent; decides nothing.

    Implementations: ``executor_svc.runner.ModelRunner`` (torch) and
    ``executor_svc.fake_runner.FakeRunner`` (deterministic, no torch).
    """

    def execute(self, plan: BatchPlan) -> StepResult:
        """Release ``plan.finished_ids`` / ``plan.preempted_ids``, then run the new and
        cached slices and return one sampled token per slice with ``sample=True``
        (new slices first, then cached, in plan order).

        Raises:
            PlanError: the plan is inconsistent (unknown or duplicate ids, a chunk
                past the end of a sequence, a ``num_computed_tokens`` mismatch,
                block ids out of range or too few); nothing was changed.
        """
        ...

    def release(self, req_ids: Iterable[str]) -> None:
        """Forget these requests (unknown ids are ignored)."""
        ...

    def info(self) -> ExecutorInfo:
        """Static facts about the model and the KV memory."""
        ...

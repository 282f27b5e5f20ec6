"""Batch-time estimators: SLAI's closed-loop feedback.

After every iteration the driver reports the iteration's wall time
(``update``'s now minus ``schedule``'s now, i.e. scheduling + RPC + executor).
SLAI's deadlines use the estimate; the service exposes it in stats.
"""

from __future__ import annotations

from typing import Protocol


class BatchTimeEstimator(Protocol):
    """Running estimate of one iteration's duration, in seconds."""

    @property
    def mean_s(self) -> float: ...

    @property
    def count(self) -> int: ...

    def observe(self, duration_s: float) -> None: ...


class _Estimate:
    __slots__ = ("_mean", "_n")

    def __init__(self) -> None:
        self._mean = 0.0
        self._n = 0

    @property
    def mean_s(self) -> float:
        return self._mean

    @property
    def count(self) -> int:
        return self._n


class CumulativeMean(_Estimate):
    """Mean of every iteration since start; initial value 0 (the authors' current code)."""

    __slots__ = ()

    def observe(self, duration_s: float) -> None:
        if duration_s < 0:
            raise ValueError(f"negative batch duration {duration_s}")
        self._n += 1
        self._mean += (duration_s - self._mean) / self._n


class Ewma(_Estimate):
    """Exponentially weighted mean (the authors' older versions used alpha=0.1).

    The first observation seeds the estimate, so it does not start biased at 0.
    """

    __slots__ = ("_alpha",)

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        super().__init__()
        self._alpha = alpha

    def observe(self, duration_s: float) -> None:
        if duration_s < 0:
            raise ValueError(f"negative batch duration {duration_s}")
        self._n += 1
        self._mean = duration_s if self._n == 1 else self._mean + self._alpha * (duration_s - self._mean)


def make_estimator(spec: str) -> BatchTimeEstimator:
    """``"cumulative"`` or ``"ewma"`` / ``"ewma(0.2)"``."""
    spec = spec.strip().lower()
    if spec == "cumulative":
        return CumulativeMean()
    if spec.startswith("ewma"):
        rest = spec[4:].strip("() ")
        return Ewma(float(rest)) if rest else Ewma()
    raise ValueError(f"unknown batch-time estimator {spec!r}: use 'cumulative' or 'ewma(alpha)'")

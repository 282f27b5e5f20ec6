"""A histogram with log-spaced buckets: quantiles to a fixed relative precision at one add per sample.

The Prometheus histograms (``telemetry/token_metrics.py``) use a dozen dashboard buckets, too coarse
to tell a 54 ms TBT tail from a 57 ms one. This one keeps buckets 1% wide (by default) from 10 µs to
10,000 s, so any quantile it reports is within half a percent of the exact sample quantile, at the cost
of a ``log`` and an increment per sample. The scheduler keeps one for its TBT gaps and reports
quantiles of it in ``Stats`` (``slai-serve agree`` compares them with the simulator's exact gaps,
docs/results.md, *Live agreement*).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class LogHistogram:
    """Counts of positive samples in buckets ``[lo * r**i, lo * r**(i+1))`` with ``r = 1 + rel_width``.

    Samples at or below ``lo`` count in the first bucket, at or above ``hi`` in the last.
    """

    __slots__ = ("lo", "ratio", "_scale", "_last", "counts", "count")

    def __init__(self, rel_width: float = 0.01, lo: float = 1e-5, hi: float = 1e4) -> None:
        if not (rel_width > 0 and 0 < lo < hi):
            raise ValueError(f"LogHistogram: need rel_width > 0 and 0 < lo < hi, got {rel_width}, {lo}, {hi}")
        self.lo = lo
        self.ratio = 1.0 + rel_width
        self._scale = 1.0 / math.log(self.ratio)
        self._last = int(math.log(hi / lo) * self._scale)
        self.counts = [0] * (self._last + 1)
        self.count = 0

    def add(self, x: float) -> None:
        i = int(math.log(x / self.lo) * self._scale) if x > self.lo else 0
        self.counts[i if i < self._last else self._last] += 1
        self.count += 1

    def add_all(self, xs: Iterable[float]) -> LogHistogram:
        for x in xs:
            self.add(x)
        return self

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1): the geometric middle of the bucket holding the sample of that
        rank (the ``ceil(q * count)``-th smallest); None when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile: q must be in [0, 1], got {q}")
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        acc = 0
        for i, n in enumerate(self.counts):
            acc += n
            if acc >= rank:
                return self.lo * self.ratio ** (i + 0.5)
        return None  # unreachable: the counts sum to count

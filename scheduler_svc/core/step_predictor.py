"""When will the running step end? What planning ahead waits for: in the live loop
(scheduler_svc/step_loop.py) and in the simulator's model of it (simulator/plan_ahead.py)."""

from __future__ import annotations


class StepTimePredictor:
    """When will the running step end? The executor's recent ``total_ns`` for steps of a
    similar size (buckets by powers of two of the token count), with a margin of twice
    the recent prediction error, so planning ahead starts early enough but not much earlier.

    A linear fit would not do: step time is flat below the compute knee (decode-only
    steps) and linear above it, and a fit across both mispredicts the common case.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.by_bucket: dict[int, float] = {}
        self.error_s = 0.0  # EWMA of |actual - predicted|

    def observe(self, num_tokens: int, total_s: float) -> None:
        if num_tokens <= 0:
            return  # release-only plans
        a, b = self.alpha, num_tokens.bit_length()
        old = self.by_bucket.get(b)
        if old is None:
            self.by_bucket[b] = total_s
            return
        self.error_s += a * (abs(total_s - old) - self.error_s)
        self.by_bucket[b] = old + a * (total_s - old)

    def predict(self, num_tokens: int) -> float:
        """Expected duration minus the margin (0 when nothing is known yet)."""
        buckets = self.by_bucket
        if not buckets:
            return 0.0
        b = num_tokens.bit_length()
        est = buckets.get(b)
        if est is None:
            est = buckets[min(buckets, key=lambda k: abs(k - b))]
        return max(0.0, est - 2 * self.error_s)

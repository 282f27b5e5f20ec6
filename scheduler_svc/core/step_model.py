"""An online linear step-time model, T(x) = a + b * x, fitted from measured steps.

Closed-loop like SLAI's batch-time estimate, but it also learns how step time
grows with the number of tokens, so a policy can size a step to a time limit.
Weighted least squares with exponential forgetting; stdlib only. Steps below
``min_tokens`` (the memory-bound floor of the curve) are not used for the slope.
"""

from __future__ import annotations


class OnlineStepModel:
    def __init__(self, min_tokens: int = 128, forgetting: float = 0.999, min_samples: int = 20) -> None:
        self.min_tokens = min_tokens
        self.forgetting = forgetting
        self.min_samples = min_samples
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._n = 0
        self.a = 0.0
        self.b = 0.0

    @property
    def ready(self) -> bool:
        return self._n >= self.min_samples and self.b > 0

    def observe(self, num_tokens: int, duration_s: float) -> None:
        if num_tokens < self.min_tokens or duration_s <= 0:
            return
        f = self.forgetting
        x, y = float(num_tokens), duration_s
        self._w = f * self._w + 1.0
        self._sx = f * self._sx + x
        self._sy = f * self._sy + y
        self._sxx = f * self._sxx + x * x
        self._sxy = f * self._sxy + x * y
        self._n += 1
        var = self._w * self._sxx - self._sx * self._sx
        if var > 1e-9 * self._w * self._sxx:
            self.b = (self._w * self._sxy - self._sx * self._sy) / var
            self.a = (self._sy - self.b * self._sx) / self._w

    def predict(self, num_tokens: int) -> float:
        return self.a + self.b * num_tokens

    def max_tokens_within(self, seconds: float) -> int:
        """Largest token count whose predicted step time is <= ``seconds`` (0 if none)."""
        if not self.ready or seconds <= self.a:
            return 0
        return int((seconds - self.a) / self.b)

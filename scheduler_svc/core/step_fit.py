"""An online step-time law over a step's composition, fitted from measured steps.

``OnlineStepModel`` (step_model.py) learns ``T = a + b x tokens``. On a GPU a
step's time also grows with how many decodes it carries (per-sequence work) and
with the KV context those decodes read (memory bandwidth), and a step that
mixes prefill and decode can cost more than its parts. This model learns

    T = w0 + w1 x prefill_tokens + w2 x decodes + w3 x decode_context + w4 x mixed

by weighted least squares with exponential forgetting, from the same closed
loop as SLAI's batch-time estimate: the measured duration of each step (the
scheduler's ``update``), never a cost model's constants. All four features are
known when a step is being sized, so a policy can ask for the largest prefill
that fits a time limit given the decodes it will carry (``max_prefill_within``).

Stdlib only: the normal equations (5 x 5) are accumulated per step and solved
by Gaussian elimination with a small ridge term relative to each feature's
scale, so collinear features (e.g. every step so far mixed) do not break the
solve. Steps below ``min_tokens`` (the flat, memory-bound floor of the curve)
are not used.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_FEATURES = 5  # 1, prefill tokens, decodes, decode context, mixed flag


@dataclass(frozen=True, slots=True)
class StepShape:
    """What a step holds, as far as its time is concerned."""

    prefill_tokens: int
    decodes: int
    decode_context: int  # SUM over the step's decodes of the KV tokens each one reads

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decodes

    @property
    def mixed(self) -> bool:
        return self.prefill_tokens > 0 and self.decodes > 0

    def features(self) -> tuple[float, ...]:
        return (1.0, float(self.prefill_tokens), float(self.decodes), float(self.decode_context),
                1.0 if self.mixed else 0.0)


class OnlineStepFit:
    """Online least-squares fit of step time against :class:`StepShape` features."""

    def __init__(self, min_tokens: int = 128, forgetting: float = 0.999, min_samples: int = 20,
                 ridge: float = 1e-6) -> None:
        if not 0 < forgetting <= 1:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        self.min_tokens = min_tokens
        self.forgetting = forgetting
        self.min_samples = min_samples
        self.ridge = ridge
        n = NUM_FEATURES
        self._xx = [[0.0] * n for _ in range(n)]  # decayed sum of x x^T
        self._xy = [0.0] * n  # decayed sum of x y
        self._n = 0
        self.coef: tuple[float, ...] = (0.0,) * n

    @property
    def count(self) -> int:
        """Steps used so far."""
        return self._n

    @property
    def ready(self) -> bool:
        """Enough steps seen and a positive cost per prefill token (so sizing is defined)."""
        return self._n >= self.min_samples and self.coef[1] > 0

    def observe(self, shape: StepShape, duration_s: float) -> None:
        if shape.tokens < self.min_tokens or duration_s <= 0:
            return
        x = shape.features()
        f = self.forgetting
        xx, xy = self._xx, self._xy
        for i in range(NUM_FEATURES):
            xi = x[i]
            row = xx[i]
            for j in range(NUM_FEATURES):
                row[j] = f * row[j] + xi * x[j]
            xy[i] = f * xy[i] + xi * duration_s
        self._n += 1
        # the prefill-token slope is only known once step sizes have varied (all steps at one
        # size would let the ridge split their time between intercept and slope arbitrarily)
        w, sx, sxx = xx[0][0], xx[0][1], xx[1][1]
        if self._n >= self.min_samples and w * sxx - sx * sx > 1e-9 * w * sxx:
            coef = self._solve()
            if coef is not None:
                self.coef = coef

    def _solve(self) -> tuple[float, ...] | None:
        n = NUM_FEATURES
        # ridge relative to each feature's own scale: features differ by orders of magnitude
        a = [row[:] + [self._xy[i]] for i, row in enumerate(self._xx)]
        for i in range(n):
            a[i][i] += self.ridge * a[i][i] + 1e-12
        for col in range(n):
            piv = max(range(col, n), key=lambda r: abs(a[r][col]))
            if abs(a[piv][col]) < 1e-300:
                return None
            a[col], a[piv] = a[piv], a[col]
            p = a[col]
            for r in range(col + 1, n):
                m = a[r][col] / p[col]
                if m:
                    ar = a[r]
                    for k in range(col, n + 1):
                        ar[k] -= m * p[k]
        w = [0.0] * n
        for i in range(n - 1, -1, -1):
            s = a[i][n] - sum(a[i][k] * w[k] for k in range(i + 1, n))
            w[i] = s / a[i][i]
        return tuple(w)

    def predict(self, shape: StepShape) -> float:
        return sum(c * x for c, x in zip(self.coef, shape.features()))

    def max_prefill_within(self, seconds: float, decodes: int, decode_context: int) -> int:
        """Largest prefill token count whose predicted mixed step (with these decodes)
        takes <= ``seconds`` (0 if none). Decode, context and mixing terms fitted below
        zero (noise where they cost nothing) are counted as zero, which only shrinks steps."""
        if not self.ready:
            return 0
        w0, w_tok, w_dec, w_ctx, w_mix = self.coef
        fixed = w0 + max(0.0, w_dec) * decodes + max(0.0, w_ctx) * decode_context
        if decodes:
            fixed += max(0.0, w_mix)
        if seconds <= fixed:
            return 0
        return int((seconds - fixed) / w_tok)

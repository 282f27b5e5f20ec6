"""Slack-sized steps: the per-step token budget FairBatching and QoServe derive from decode deadlines.

Both size each step by *time*, not tokens: the step may take ``tile_slack_fraction``
of the tightest decode slack (time until a decode-ready request's next token is
due, ``last token + TBT objective - now``), converted to tokens with an online fit
of measured step times (``step_model.py``), between ``min_token_budget`` and
``max_token_budget``. Ample slack gives a big step (prefill bursts); a decode near
its deadline shrinks it. Until the fit is ready (or with no decode running) the
step is ``token_budget`` / ``max_token_budget`` respectively.
"""

from __future__ import annotations

from scheduler_svc.core.config import SchedulerConfig
from scheduler_svc.core.request import Request
from scheduler_svc.core.step_model import OnlineStepModel


class SlackSizedSteps:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.model = OnlineStepModel()
        self.last_budget = config.token_budget

    def observe(self, num_tokens: int, duration_s: float) -> None:
        self.model.observe(num_tokens, duration_s)

    def predict_s(self, num_tokens: int, fallback_s: float) -> float:
        """Predicted time of a step of ``num_tokens`` tokens (``fallback_s`` before the fit is ready)."""
        return self.model.predict(num_tokens) if self.model.ready else fallback_s

    def budget(self, min_slack_s: float | None) -> int:
        """Tokens of this step given the tightest decode slack (None: no decode running)."""
        c = self.config
        lo = min(c.min_token_budget, c.token_budget)
        hi = max(c.token_budget, c.max_token_budget)
        if not self.model.ready:
            budget = c.token_budget
        elif min_slack_s is None:
            budget = hi
        else:
            budget = min(hi, max(lo, self.model.max_tokens_within(c.tile_slack_fraction * min_slack_s)))
        self.last_budget = budget
        return budget


def next_token_deadline(req: Request, default_tbt_s: float, now: float) -> float:
    """When a decode-ready request's next token is due: its TBT objective after the last one
    (after ``now`` while its first token is still in flight, under pipelined scheduling)."""
    tbt = req.tbt_slo_s if req.tbt_slo_s is not None else default_tbt_s
    last = req.last_token_s
    return (now if last is None else last) + tbt

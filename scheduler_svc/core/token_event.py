"""What the core reports per request per step: new output tokens (what streams fan out)."""

from __future__ import annotations

from typing import NamedTuple


# NOTE: a NamedTuple, not a frozen dataclass: one is built per decode per step (see contract/plan.py).
class TokenEvent(NamedTuple):
    """New output tokens of one request from one step (what streams fan out)."""

    req_id: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "ignored" | None
    time_s: float = 0.0  # scheduler clock
    is_first: bool = False  # carries the first output token (TTFT stamp)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # outputs so far, including these
    ttft_s: float | None = None  # set on the first token: first_token - arrival
    tbt_s: float | None = None  # gap since this request's previous token
    # None unless the request asked for logprobs: then aligned with token_ids, the executor's opaque
    # per-token values (contract.logprobs.SampleLogprobs or None), passed through untouched
    logprobs: tuple | list | None = None

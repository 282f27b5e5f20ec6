"""Log probabilities an executor reports for the requests that ask (``SamplingParams.logprobs`` /
``prompt_logprobs``): plain values carried unchanged from the executor through the scheduler to the gateway.

The scheduler's core never looks inside them: it attaches each one to its token's event.
"""

from __future__ import annotations

from typing import NamedTuple


class TokenLogprob(NamedTuple):
    """One position: the logprob of the token that is there, and the top alternatives (best first)."""

    token_id: int
    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


class SampleLogprobs(NamedTuple):
    """What one sampled token carries for a request that asked for logprobs.

    ``token``: the sampled token's entry (None when only prompt logprobs were asked for).
    ``prompt``: the prompt's tokens 1..P-1 (the first has no context), on the request's first
    sampled token only, and never again for the same request (not after a recompute either).
    """

    token: TokenLogprob | None = None
    prompt: tuple[TokenLogprob, ...] | None = None

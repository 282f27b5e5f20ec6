"""Request state, counted in tokens, not phases: chunked prefill, decode and recompute follow from two counters.

A request knows how many tokens it has (prompt + outputs so far) and how many of
them have KV computed. Everything else follows:

* ``num_tokens - num_computed_tokens > 1``  -> it still prefills (chunkable);
* ``num_tokens - num_computed_tokens == 1`` -> it decodes (one token per step);
* a token is sampled whenever a step brings ``num_computed_tokens`` up to
  ``num_tokens``; the token sampled at the last prefill chunk *is* the first
  output token (the authors' code discards it and decodes once more).

Recompute preemption resets ``num_computed_tokens`` to 0; the outputs so far are
kept, so the request's "prompt" for scheduling becomes prompt + outputs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from contract.sampling import SamplingParams
from contract.tiers import Tier


class RequestStatus(enum.IntEnum):
    """Lifecycle. Ordered so that ``status > PREEMPTED`` means finished."""

    WAITING = 0
    RUNNING = 1  # holds KV blocks (prefilling or decoding)
    PREEMPTED = 2  # back in the waiting queue, KV freed, must recompute
    FINISHED_STOPPED = 3  # sampled a stop token
    FINISHED_LENGTH = 4  # reached max_tokens
    FINISHED_ABORTED = 5  # client abort or executor loss with no replacement
    FINISHED_IGNORED = 6  # longer than max_model_len; never scheduled

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_IGNORED: "ignored",
}


@dataclass(slots=True, eq=False)
class Request:
    """Mutable scheduling state of one request. Owned by the scheduler core only.

    Runners never see this object: they get frozen slices in a ``BatchPlan``.
    """

    req_id: str
    num_prompt_tokens: int
    max_tokens: int  # output tokens wanted (the trace's decode length)
    arrival_s: float  # on the scheduler's clock
    tier: Tier = Tier.FREE
    tbt_slo_s: float | None = None  # None -> policy default (paper: 0.2 s)
    ttft_slo_s: float | None = None  # optional; used by deadline-aware policies
    prompt_token_ids: tuple[int, ...] | None = None  # None in the simulator
    sampling: SamplingParams = field(default_factory=SamplingParams)

    # --- progress, all in tokens ---
    num_computed_tokens: int = 0  # tokens of this request whose KV is computed
    output_token_ids: list[int] = field(default_factory=list)
    num_output_tokens: int = 0  # == len(output_token_ids) when ids are tracked
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # outputs counted ahead of their step's result (pipelined scheduling): already in
    # num_output_tokens, not yet in output_token_ids; 0 whenever no step is in flight
    num_pending_outputs: int = 0

    # --- timestamps on the scheduler's clock (None until they happen) ---
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None

    # --- bookkeeping used by queues / routing ---
    seq: int = 0  # admission order tie-breaker, set by the core
    block_hashes: list[int] | None = None  # prefix caching: chained hashes of full blocks (core/prefix_cache.py)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1:
            raise ValueError(f"request {self.req_id!r}: prompt must have >= 1 token")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.req_id!r}: max_tokens must be >= 1")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.num_prompt_tokens:
            raise ValueError(f"request {self.req_id!r}: prompt_token_ids length != num_prompt_tokens")

    # ---- derived quantities ----
    @property
    def num_tokens(self) -> int:
        """Prompt + outputs so far: every token that has or will have KV."""
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True until the step that samples the first token after (re)admission."""
        return not self.is_decode

    @property
    def is_decode(self) -> bool:
        out = self.num_output_tokens
        return out > 0 and self.num_prompt_tokens + out - self.num_computed_tokens == 1

    @property
    def num_remaining_outputs(self) -> int:
        return self.max_tokens - self.num_output_tokens

    @property
    def num_outstanding_tokens(self) -> int:
        """Work left in tokens: uncomputed prompt + remaining outputs (routing's load measure)."""
        return self.num_uncomputed_tokens - (1 if self.is_decode else 0) + self.num_remaining_outputs

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_paying(self) -> bool:
        return self.tier == Tier.PAYING

    def all_token_ids(self) -> tuple[int, ...] | None:
        """Prompt + outputs (what a recompute must process), or None in the simulator."""
        if self.prompt_token_ids is None:
            return None
        return self.prompt_token_ids + tuple(self.output_token_ids)

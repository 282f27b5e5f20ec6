"""The runner's work for requests with logit processors or logprobs (``RequestState.has_extras``).

``ModelRunner.execute`` calls these only while such a request is live, so a step without one
pays nothing. Three parts:

* :func:`prompt_rows`: which extra logits rows to keep for prompt logprobs (every position of a
  prompt chunk whose next token is still prompt), besides the sampling rows;
* :func:`processed_logits`: the sampling rows after penalties / bias / min_tokens (executor_svc/penalties.py);
* :func:`collect`: the ``SampleLogprobs`` each sampling request reports with its token.

A request's prompt logprobs are gathered over its prefill chunks in ``RequestState.prompt_logprobs``
and sent once, with its first sampled token. A preemption before that drops them with the state and
the recompute makes them again; a recompute after it (a new slice that has outputs) makes none, so
the gateway never gets them twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from contract.logprobs import SampleLogprobs
from executor_svc.logprobs import token_logprobs
from executor_svc.penalties import apply_processors
from executor_svc.request_cache import RequestState, ScheduledChunk


@dataclass(slots=True)
class PromptRows:
    """Packed rows whose logits score a prompt token, and whom they belong to."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # the prompt token each row predicts
    ks: list[int] = field(default_factory=list)  # top alternatives wanted per row
    owners: list[tuple[RequestState, int]] = field(default_factory=list)  # (state, its number of rows), in order


def prompt_rows(chunks: Sequence[ScheduledChunk]) -> PromptRows:
    """Rows of the step's packed sequence that predict a prompt token of a request wanting prompt logprobs.

    NOTE: follows ModelRunner._prepare's packing: decodes first (one row each), then prefill chunks.
    """
    out = PromptRows()
    row = 0
    for c in [c for c in chunks if c.is_decode] + [c for c in chunks if not c.is_decode]:
        st = c.state
        if st.prompt_logprobs is not None:
            # position p predicts token p + 1; only prompt targets (p + 1 < num_prompt_tokens) count
            last = min(c.start + c.num_new_tokens, st.num_prompt_tokens - 1)
            n = max(0, last - c.start)
            if n:
                out.rows.extend(range(row, row + n))
                out.targets.extend(st.token_ids[c.start + 1:last + 1])
                out.ks.extend([st.sampling.prompt_logprobs or 0] * n)
                out.owners.append((st, n))
        row += c.num_new_tokens
    return out


def processed_logits(logits: torch.Tensor, sample_chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
    """The sampling rows with each request's processors applied (unchanged when none has any)."""
    rows = [j for j, c in enumerate(sample_chunks) if c.state.has_extras and c.state.sampling.has_processors]
    if not rows:
        return logits
    states = [sample_chunks[j].state for j in rows]
    return apply_processors(logits, rows, [s.sampling for s in states], [s.token_ids for s in states],
                            [s.num_prompt_tokens for s in states])


def collect(all_logits: torch.Tensor, processed: torch.Tensor, sample_chunks: Sequence[ScheduledChunk],
            tokens: Sequence[int], prompt: PromptRows) -> dict[str, SampleLogprobs]:
    """Request id -> what its sampled token reports; also banks this step's prompt logprobs.

    ``all_logits``: the kept rows (sampling rows first, then ``prompt.rows``); ``processed``: the
    sampling rows after processors.
    """
    ns = len(sample_chunks)
    if prompt.rows:
        entries = token_logprobs(all_logits[ns:], prompt.targets, prompt.ks)
        i = 0
        for st, n in prompt.owners:
            st.prompt_logprobs.extend(entries[i:i + n])
            i += n
    rows = [j for j, c in enumerate(sample_chunks) if c.state.sampling.logprobs is not None]
    own = {}
    if rows:
        params = [sample_chunks[j].state.sampling for j in rows]
        entries = token_logprobs(processed[rows], [tokens[j] for j in rows], [p.logprobs for p in params],
                                 [p.temperature for p in params])
        own = dict(zip(rows, entries))
    out: dict[str, SampleLogprobs] = {}
    for j, c in enumerate(sample_chunks):
        st = c.state
        if not st.has_extras:
            continue
        sent_prompt = None
        if st.prompt_logprobs is not None:
            sent_prompt, st.prompt_logprobs = tuple(st.prompt_logprobs), None
        tok = own.get(j)
        if tok is not None or sent_prompt is not None:
            out[st.req_id] = SampleLogprobs(tok, sent_prompt)
    return out

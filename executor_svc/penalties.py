"""Per-request logit processors: logit_bias, min_tokens, repetition / frequency / presence penalties.

Applied by the runner to the sampling rows of the requests whose ``SamplingParams.has_processors``
is set, before temperature and sampling; a step without such a request never calls this.
Meanings and order follow vLLM (docs/gateway.md, "OpenAI parameters"):

1. ``logit_bias``: added to the named tokens' logits;
2. ``min_tokens``: the stop tokens get -inf while the request has fewer outputs (unless ``ignore_eos``);
3. ``repetition_penalty`` r, over prompt + output tokens: a positive logit is divided by r, a negative one
   multiplied by r;
4. ``frequency_penalty`` f and ``presence_penalty`` p, over output tokens only:
   ``logit -= f * count + p * (count > 0)``.

The counts are built with one batched ``scatter_add`` over the processed rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from contract.sampling import SamplingParams


def apply_processors(logits: torch.Tensor, rows: Sequence[int], params: Sequence[SamplingParams],
                     token_ids: Sequence[Sequence[int]], num_prompt_tokens: Sequence[int]) -> torch.Tensor:
    """A float32 copy of ``logits`` ``[N, V]`` with the processors of ``rows`` applied.

    ``params[j]``, ``token_ids[j]`` (the request's prompt + outputs so far) and ``num_prompt_tokens[j]``
    describe row ``rows[j]``. Token ids outside the vocabulary (a bias for id >= V) are ignored.
    """
    out = logits.float().clone()
    if not rows:
        return out
    dev, vocab = out.device, out.shape[1]
    sub = out[list(rows)]
    n = len(rows)
    # 1. logit_bias
    for j, p in enumerate(params):
        for tok, bias in p.logit_bias:
            if tok < vocab:
                sub[j, tok] += bias
    # 2. min_tokens: the request cannot stop yet
    for j, p in enumerate(params):
        if p.min_tokens and not p.ignore_eos and len(token_ids[j]) - num_prompt_tokens[j] < p.min_tokens:
            stops = [t for t in p.stop_token_ids if t < vocab]
            if stops:
                sub[j, stops] = float("-inf")
    # 3./4. penalties need token counts: one padded [n, L] id matrix, one scatter_add each
    need_rep = [p.repetition_penalty != 1.0 for p in params]
    need_out = [bool(p.frequency_penalty or p.presence_penalty) for p in params]
    if any(need_rep) or any(need_out):
        out_counts = _counts([list(token_ids[j][num_prompt_tokens[j]:]) for j in range(n)], vocab, dev)
        if any(need_rep):
            prompt_seen = _counts([list(token_ids[j][:num_prompt_tokens[j]]) for j in range(n)], vocab, dev) > 0
            seen = prompt_seen | (out_counts > 0)
            rep = torch.tensor([p.repetition_penalty for p in params], device=dev, dtype=torch.float32)[:, None]
            penalised = torch.where(sub > 0, sub / rep, sub * rep)
            sub = torch.where(seen, penalised, sub)
        if any(need_out):
            freq = torch.tensor([p.frequency_penalty for p in params], device=dev, dtype=torch.float32)[:, None]
            pres = torch.tensor([p.presence_penalty for p in params], device=dev, dtype=torch.float32)[:, None]
            sub = sub - freq * out_counts - pres * (out_counts > 0).float()
    out[list(rows)] = sub
    return out


def _counts(seqs: list[list[int]], vocab: int, dev: torch.device) -> torch.Tensor:
    """``[len(seqs), vocab]`` float32: how often each token occurs in each sequence."""
    width = max((len(s) for s in seqs), default=0)
    counts = torch.zeros((len(seqs), vocab + 1), device=dev, dtype=torch.float32)
    if width:
        # NOTE: padding goes to the extra column ``vocab``, which is dropped
        ids = torch.tensor([s + [vocab] * (width - len(s)) for s in seqs], device=dev, dtype=torch.long)
        ids = ids.clamp_(0, vocab)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]

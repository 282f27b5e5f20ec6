"""Log probabilities for the requests that ask for them (``SamplingParams.logprobs`` / ``prompt_logprobs``).

Which distribution (docs/gateway.md, "Log probabilities"):

* a **sampled token**'s logprob and its top alternatives come from the distribution it was sampled
  from: the logits after the request's processors (bias, penalties, executor_svc/penalties.py) and
  its temperature (temperature 0, greedy: the distribution at temperature 1), before top-k / top-p
  truncation (which would make the alternatives -inf);
* a **prompt token**'s logprob is the model's own distribution (temperature 1, no processors):
  nothing was sampled from it, and it is what loglikelihood evaluation scores.

Rows are processed in slices of :data:`ROWS_PER_SLICE`, so a long echoed prompt needs one
``[slice, vocab]`` float32 temporary at a time besides its logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from contract.logprobs import TokenLogprob

ROWS_PER_SLICE = 256


def token_logprobs(logits: torch.Tensor, targets: Sequence[int], ks: Sequence[int],
                   temperatures: Sequence[float] | None = None) -> list[TokenLogprob]:
    """Row ``i`` of ``logits`` ``[N, V]`` scored at ``targets[i]``, with its top ``ks[i]`` alternatives.

    ``temperatures[i]`` > 0 divides row ``i`` first (None or 0: temperature 1).
    """
    out: list[TokenLogprob] = []
    for lo in range(0, logits.shape[0], ROWS_PER_SLICE):
        hi = min(lo + ROWS_PER_SLICE, logits.shape[0])
        rows = logits[lo:hi].float()
        if temperatures is not None:
            t = torch.tensor([x if x > 0 else 1.0 for x in temperatures[lo:hi]], device=rows.device,
                             dtype=torch.float32)
            rows = rows / t[:, None]
        lp = torch.log_softmax(rows, dim=-1)
        tgt = torch.tensor(targets[lo:hi], device=lp.device, dtype=torch.long)
        chosen = lp.gather(1, tgt[:, None])[:, 0].tolist()
        kmax = max(ks[lo:hi])
        if kmax:
            top_v, top_i = torch.topk(lp, kmax, dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        for j in range(hi - lo):
            k = ks[lo + j]
            if k:
                out.append(TokenLogprob(targets[lo + j], chosen[j], tuple(top_i[j][:k]), tuple(top_v[j][:k])))
            else:
                out.append(TokenLogprob(targets[lo + j], chosen[j]))
    return out

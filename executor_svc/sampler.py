"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Logits arrive only for the rows that sample (the runner passes an index tensor
as ``logits_to_keep``), so this works on ``[N, vocab]`` with N = sampled slices.

Drawing: inverse CDF, one uniform per row over the row's (filtered) weights. Rows without
top-k/top-p are drawn by the C++ kernel when the sampler has one (``executor_svc.cpu_kernels``:
two passes over a row instead of torch's six; the same uniform picks the same column up to the
rounding of the weights).
Seeding: a request with ``seed`` draws its token at sequence position ``pos``
from a generator seeded with ``mix(seed, pos)``. Re-seeding per position
(instead of advancing one generator per request) keeps a request's tokens the
same after a recompute preemption, when the executor forgets its state and the
request returns as a new slice. Requests without a seed draw from the runner's
own generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from contract.sampling import SamplingParams

_MASK64 = (1 << 63) - 1
TOP_CANDIDATES = 1024  # columns sorted for top-p rows without top-k (more only when the nucleus needs them)


def mix_seed(seed: int, position: int) -> int:
    """A 63-bit seed from (request seed, token position); splitmix64-style mixing."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & _MASK64


class Sampler:
    """Samples one token per logits row."""

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0, kernels=None) -> None:
        self.device = torch.device(device)
        # executor_svc.cpu_kernels.CpuKernels (CPU only) or None
        self.kernels = kernels if self.device.type == "cpu" else None
        self._unseeded = torch.Generator(device=self.device)
        self._unseeded.manual_seed(seed)
        self._row_gen = torch.Generator(device=self.device)

    def sample(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]
    ) -> list[int]:
        """``logits`` ``[N, V]``; ``params[i]`` and ``positions[i]`` (index of the token
        being sampled in its sequence) describe row ``i``. Returns N token ids."""
        if not logits.shape[0] == len(params) == len(positions):
            raise ValueError(f"{logits.shape[0]} logits rows, {len(params)} params, {len(positions)} positions")
        if logits.shape[0] == 0:
            return []
        greedy = [i for i, p in enumerate(params) if p.temperature == 0.0 or p.top_k == 1]
        rows = sorted(set(range(len(params))) - set(greedy))
        if not rows:
            return torch.argmax(logits, dim=-1).tolist()
        out = [0] * len(params)
        if greedy:
            for i, tok in zip(greedy, torch.argmax(logits[greedy], dim=-1).tolist()):
                out[i] = tok
        picked = self._sample_rows(logits[rows] if greedy else logits, [params[i] for i in rows],
                                   [positions[i] for i in rows])
        for i, tok in zip(rows, picked):
            out[i] = tok
        return out

    def _sample_rows(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                     positions: Sequence[int]) -> list[int]:
        """Batched temperature / top-k / top-p; only the uniform draw is per row."""
        n, vocab = logits.shape
        dev = logits.device
        temps = torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float32)
        ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        filtered = [i for i, p in enumerate(params) if ks[i] < vocab or p.top_p < 1.0]
        plain = sorted(set(range(n)) - set(filtered))
        out = [0] * n
        for idx, with_filters in ((plain, False), (filtered, True)):
            if not idx:
                continue
            whole = len(idx) == n
            rows, row_temps = (logits, temps) if whole else (logits[idx], temps[idx])
            sub = [params[i] for i in idx]
            pos = [positions[i] for i in idx]
            if not with_filters and self.kernels is not None:  # the C++ inverse CDF over the unscaled logits
                picks = self.kernels.sample_rows(rows.float(), 1.0 / row_temps, self._uniforms(sub, pos))
            else:
                scaled = rows.float() / row_temps[:, None]
                if with_filters:  # weights over each row's sorted candidates, and their token ids
                    weights, order = self._filtered_weights(scaled, sub, [ks[i] for i in idx])
                else:
                    weights, order = torch.softmax(scaled, dim=-1), None
                picks = self._draw(weights, sub, pos)
                if order is not None:
                    picks = order.gather(1, picks[:, None])[:, 0]
            for i, t in zip(idx, picks.tolist()):
                out[i] = t
        return out

    def _filtered_weights(self, scaled: torch.Tensor, params: Sequence[SamplingParams],
                          ks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised weights over each row's best candidates in descending order, and their token ids.

        top-k first, then top-p over the renormalised top-k distribution (as vLLM). Only the
        best ``TOP_CANDIDATES`` (or the largest top-k) columns are sorted: a full sort of a
        49,152-token row took 2.7 ms on CPU, ``topk`` of 1,024 0.37 ms. A top-p row
        without top-k whose nucleus reaches beyond them is redone with a full sort.
        """
        vocab = scaled.shape[1]
        dev = scaled.device
        width = min(vocab, max(k if k < vocab else TOP_CANDIDATES for k in ks))
        vals, order = torch.topk(scaled, width, dim=-1)  # sorted, descending
        cols = torch.arange(width, device=dev)[None, :]
        k_t = torch.tensor(ks, device=dev)
        has_k = k_t < vocab
        vals = vals.masked_fill(cols >= k_t[:, None], float("-inf"))
        # rows with top-k: renormalise over their k columns; rows without: the FULL row's
        # normaliser, so that top-p's mass (and the check below) refers to the whole distribution
        norm = torch.logsumexp(vals, dim=-1)
        if not bool(has_k.all()):  # the full row's pass only where a row needs it
            norm = torch.where(has_k, norm, torch.logsumexp(scaled, dim=-1))
        probs = torch.exp(vals - norm[:, None])
        top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)
        short = (~has_k) & (probs.sum(dim=-1) < top_p) & (width < vocab)
        if bool(short.any()):  # the nucleus is wider than the candidates: sort those rows fully
            full_vals, full_order = torch.sort(scaled[short], dim=-1, descending=True)
            full = torch.exp(full_vals - torch.logsumexp(full_vals, dim=-1, keepdim=True))
            probs = torch.nn.functional.pad(probs, (0, vocab - width))
            order = torch.nn.functional.pad(order, (0, vocab - width))
            probs[short], order[short] = full, full_order
        # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        return probs.masked_fill(mass_before >= top_p[:, None], 0.0), order

    def _draw(self, weights: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]) -> torch.Tensor:
        """One column per row with probability proportional to its weight (inverse CDF); ``[N]`` long.

        NOTE: inverse CDF needs ONE uniform per row, drawn from that request's own
        generator; the exponential race it replaced drew a whole vocabulary row of noise
        per request (1.2 ms per row for 49,152 tokens on CPU, most of a 32-row step's
        sampling: 46 ms against 11 ms now, docs/executor.md, 'Sampling').
        """
        width = weights.shape[1]
        cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)  # fp64: 49,152 fp32 sums drift
        u = self._uniforms(params, positions)[:, None]
        # the first column whose cumulative weight exceeds u * total: a zero-weight column
        # never qualifies (its cdf equals its predecessor's)
        picks = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True)[:, 0]
        over = picks >= width  # u * total rounded up to the total itself
        if bool(over.any()):
            picks = torch.where(over, weights.argmax(dim=-1), picks)
        return picks

    def _uniforms(self, params: Sequence[SamplingParams], positions: Sequence[int]) -> torch.Tensor:
        """One fp64 uniform in [0, 1) per row: from ``mix_seed(seed, position)`` for seeded rows, else the
        sampler's own generator; ``[N]`` on the sampler's device (where its generators live)."""
        u = torch.empty(len(params), dtype=torch.float64, device=self.device)
        for i, p in enumerate(params):
            if p.seed is None:
                u[i] = torch.rand(1, generator=self._unseeded, dtype=torch.float64, device=self.device)
            else:
                self._row_gen.manual_seed(mix_seed(p.seed, positions[i]))
                u[i] = torch.rand(1, generator=self._row_gen, dtype=torch.float64, device=self.device)
        return u

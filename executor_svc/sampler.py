"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Logits arrive only for the rows that sample (the runner passes an index tensor
as ``logits_to_keep``), so this works on ``[N, vocab]`` with N = sampled slices.

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


def mix_seed(seed: int, position: int) -> int:
    """A 63-bit seed from (request seed, token position); splitmix64-style mixing."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & _MASK64


class Sampler:
    """Samples one token per logits row."""

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
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
        greedy = [p.temperature == 0.0 or p.top_k == 1 for p in params]
        out = torch.argmax(logits, dim=-1).tolist()
        rows = [i for i, g in enumerate(greedy) if not g]
        if rows:
            picked = self._sample_rows(logits[rows], [params[i] for i in rows], [positions[i] for i in rows])
            for i, tok in zip(rows, picked):
                out[i] = tok
        return out

    def _sample_rows(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                     positions: Sequence[int]) -> list[int]:
        """Batched temperature / top-k / top-p; only the random draw is per row."""
        n, vocab = logits.shape
        dev = logits.device
        temps = torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float32)
        scaled = logits.float() / temps[:, None]
        filtered = any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params)
        if filtered:
            # work in descending order so top-k is a column cut and top-p a cumsum
            scaled, order = torch.sort(scaled, dim=-1, descending=True)
            ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
            cols = torch.arange(vocab, device=dev)[None, :]
            scaled = scaled.masked_fill(cols >= ks[:, None], float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if filtered:
            top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)
            # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
            mass_before = torch.cumsum(probs, dim=-1) - probs
            probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
        # NOTE: exponential race: argmax(p / E) with E ~ Exp(1) samples from p. It
        # needs one noise row per request, drawn from that request's own generator,
        # while every other operation stays batched.
        noise = torch.empty((n, vocab), device=dev, dtype=torch.float32)
        for i, p in enumerate(params):
            if p.seed is None:
                noise[i].exponential_(generator=self._unseeded)
            else:
                self._row_gen.manual_seed(mix_seed(p.seed, positions[i]))
                noise[i].exponential_(generator=self._row_gen)
        choice = torch.argmax(probs / noise, dim=-1, keepdim=True)
        if filtered:
            choice = order.gather(1, choice)
        return choice[:, 0].tolist()

"""Routing a new request to one executor, decided once at admission.

* ``least-work`` (default): join the executor with the least outstanding work in
  tokens (uncomputed prompt + remaining outputs), RAD's join-shortest-work rule.
  Counting tokens rather than requests matters because prompt lengths vary by
  two orders of magnitude (ShareGPT4: 1 to 8 k tokens); the count is kept
  incrementally by each driver, so a decision is O(executors).
* ``round-robin``: blind rotation (a baseline).
* ``power-of-two``: sample two executors, take the one with less work (cheap
  when the load signal is remote; here it is local, so it mostly serves as a
  comparison point).

Only healthy executors are candidates; an empty list means no executor can take
the request.
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence


class Routable(Protocol):
    index: int
    work: int  # outstanding tokens
    num_requests: int


class Router:
    def __init__(self, kind: str = "least-work", seed: int = 0) -> None:
        pick = {"least-work": self._least_work, "round-robin": self._round_robin,
                "power-of-two": self._power_of_two}.get(kind)
        if pick is None:
            raise ValueError(f"routing must be least-work, round-robin or power-of-two, got {kind!r}")
        self.kind = kind
        self.pick = pick
        self._rng = random.Random(seed)
        self._next = 0

    @staticmethod
    def _key(d: Routable) -> tuple[int, int, int]:
        return d.work, d.num_requests, d.index

    def _least_work(self, candidates: Sequence[Routable]) -> Routable | None:
        return min(candidates, key=self._key, default=None)

    def _round_robin(self, candidates: Sequence[Routable]) -> Routable | None:
        if not candidates:
            return None
        self._next += 1
        return candidates[(self._next - 1) % len(candidates)]

    def _power_of_two(self, candidates: Sequence[Routable]) -> Routable | None:
        if len(candidates) <= 2:
            return self._least_work(candidates)
        a, b = self._rng.sample(list(candidates), 2)
        return min(a, b, key=self._key)

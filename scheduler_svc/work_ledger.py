"""Each executor's outstanding work, kept incrementally: the signal the router balances on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from scheduler_svc.core.request import Request


def work_of(req: Request) -> int:
    """Tokens still to process (the term ``core.outstanding_tokens`` sums)."""
    return req.num_outstanding_tokens


class WorkLedger:
    """``total`` = the sum of :func:`work_of` over one core's requests, updated in O(batch) per step."""

    def __init__(self) -> None:
        self.total = 0
        self._of: dict[str, int] = {}

    def clear(self) -> None:
        self.total = 0
        self._of.clear()

    def add(self, req: Request) -> None:
        w = work_of(req)
        self._of[req.req_id] = w
        self.total += w

    def remove(self, req_id: str) -> None:
        self.total -= self._of.pop(req_id, 0)

    def update(self, ids: Iterable[str], requests: Mapping[str, Request]) -> None:
        """Re-measure the work of these requests, touched by a step (O(batch), not O(queue))."""
        if not requests:
            self.clear()
            return
        table = self._of
        delta = 0
        for rid in ids:
            req = requests.get(rid)
            old = table.get(rid, 0)
            if req is None:
                table.pop(rid, None)
                delta -= old
            else:
                new = work_of(req)
                table[rid] = new
                delta += new - old
        self.total += delta

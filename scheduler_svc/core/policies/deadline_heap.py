"""A min-heap of decode-ready requests keyed by a deadline, with lazy deletion.

Shared by SLAI-like policies (EDF, RAD). A request has at most one live entry;
pushing it again supersedes the old one.
"""

from __future__ import annotations

import heapq

from scheduler_svc.core.request import Request, RequestStatus


class DeadlineHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, float, int, Request]] = []  # (key, arrival, ticket, req)
        self._next_ticket = 0  # tickets: 0, 1, 2, ... in push order (a local counter in bulk pushes)
        self._live: dict[str, int] = {}
        self._top_valid = False  # peek() found a live entry at the top and nothing changed since
        self._sorted = False  # the heap list is sorted (push_keyed into an empty heap), not just a heap

    def push(self, req: Request, key: float) -> None:
        t = self._next_ticket
        self._next_ticket = t + 1
        self._live[req.req_id] = t
        heapq.heappush(self._heap, (key, req.arrival_s, t, req))
        self._top_valid = self._sorted = False

    def peek(self) -> tuple[float, Request] | None:
        h = self._heap
        while h:
            key, _, t, req = h[0]
            if self._live.get(req.req_id) == t and req.status is RequestStatus.RUNNING:
                self._top_valid = True
                return key, req
            heapq.heappop(h)
            self._sorted = False
            if self._live.get(req.req_id) == t:
                del self._live[req.req_id]
        return None

    def pop(self) -> Request:
        if not self._top_valid and self.peek() is None:
            raise IndexError("pop from an empty DeadlineHeap")
        self._top_valid = self._sorted = False
        req = heapq.heappop(self._heap)[3]
        del self._live[req.req_id]
        return req

    def push_all(self, reqs, key_of) -> None:
        """``push(req, key_of(req))`` for each of ``reqs`` (one call per step, not per decode)."""
        self.push_keyed(reqs, [key_of(req) for req in reqs])

    def push_keyed(self, reqs, keys) -> None:
        """``push(req, key)`` for each pair of ``reqs`` and ``keys`` (keys computed by the caller, in bulk)."""
        live, t = self._live, self._next_ticket
        entries = []
        add = entries.append
        for req, key in zip(reqs, keys):
            live[req.req_id] = t
            add((key, req.arrival_s, t, req))
            t += 1
        self._next_ticket = t
        self._insert(entries)

    def push_tbt_deadlines(self, reqs, base: float, default_tbt: float, minus: float) -> None:
        """``push(req, base + tbt - minus)`` for each of ``reqs``, ``tbt`` being the request's TBT objective
        (``default_tbt`` without one), computed in that order: SLAI's last schedulable time, bit for bit."""
        # NOTE: the hot path (once per decode per step): the keys computed in the one loop that makes entries
        live, t = self._live, self._next_ticket
        entries = []
        add = entries.append
        for req in reqs:
            tbt = req.tbt_slo_s
            live[req.req_id] = t
            add((base + (tbt if tbt is not None else default_tbt) - minus, req.arrival_s, t, req))
            t += 1
        self._next_ticket = t
        self._insert(entries)

    def _insert(self, entries: list) -> None:
        """Add new ``(key, arrival, ticket, req)`` entries (their tickets already in ``_live``)."""
        heap = self._heap
        # NOTE: tickets are unique, so entries are totally ordered and what peek/pop return depends only on
        # which entries the heap holds, not on its layout: a heapify after extend is as good as pushes (and
        # cheaper when most of the heap is new, as after a step that served every decode)
        if not heap:  # a sorted list is a heap, and the next pop_live_n of everything finds it sorted
            entries.sort()
            heap.extend(entries)
            self._sorted = True
            self._top_valid = False
            return
        elif len(entries) > len(heap):
            heap.extend(entries)
            heapq.heapify(heap)
        else:
            push = heapq.heappush
            for e in entries:
                push(heap, e)
        self._top_valid = self._sorted = False

    def pop_live_n(self, n: int) -> list[Request]:
        """Pop up to ``n`` live requests in key order."""
        h, live, pop, running = self._heap, self._live, heapq.heappop, RequestStatus.RUNNING
        self._top_valid = False
        out: list[Request] = []
        add = out.append
        if n >= len(h):  # everything goes: one sort (entries are totally ordered) instead of a pop each
            if not self._sorted:  # (after a step that served every decode, it still is)
                h.sort()
            get = live.get
            out = [req for _, _, t, req in h if get(req.req_id) == t and req.status is running]
            live.clear()  # every live entry was in the heap, and the heap is now empty
            h.clear()
            return out
        self._sorted = False
        while h and len(out) < n:
            _, _, t, req = pop(h)
            rid = req.req_id
            if live.get(rid) == t:
                del live[rid]
                if req.status == running:
                    add(req)
        return out

    def discard(self, req: Request) -> None:
        self._live.pop(req.req_id, None)
        self._top_valid = False

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, req: Request) -> bool:
        return req.req_id in self._live

"""Waiting-queue orders: FCFS, shortest-prompt-first (SPF), SPF with paying first.

Both keep their order incrementally (a deque or a heap), so a long queue is never
re-sorted from scratch. Removal is lazy: an entry whose request is no longer
waiting (admitted, aborted) is skipped when it reaches the head.

SPF reproduces the authors' stable sort of the arrived prefix (SLAI's step 3,
see policies/slai.py): key ``(tier, length, order)`` where ``order`` grows with
arrivals and *shrinks* for preempted requests pushed to the front, so among equal
keys a preempted request comes first, as a front insert followed by a stable sort does.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Iterator, Protocol

from scheduler_svc.core.request import Request, RequestStatus

_WAITING = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


class WaitingQueue(Protocol):
    def push(self, req: Request) -> None: ...  # a new arrival

    def push_front(self, req: Request) -> None: ...  # a preempted request

    def peek(self) -> Request | None: ...

    def pop(self) -> Request: ...

    def discard(self, req: Request) -> None: ...  # aborted while waiting

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Request]: ...  # live entries, any order


class FcfsQueue:
    """Arrival order; preempted requests go to the front."""

    def __init__(self) -> None:
        self._q: deque[Request] = deque()
        self._live: set[str] = set()

    def push(self, req: Request) -> None:
        self._q.append(req)
        self._live.add(req.req_id)

    def push_front(self, req: Request) -> None:
        self._q.appendleft(req)
        self._live.add(req.req_id)

    def _skip_stale(self) -> None:
        while self._q and (self._q[0].req_id not in self._live or self._q[0].status not in _WAITING):
            stale = self._q.popleft()
            if stale.req_id in self._live and stale.status not in _WAITING:
                self._live.discard(stale.req_id)

    def peek(self) -> Request | None:
        if not self._q:
            return None  # (every step asks; the queue is often empty)
        self._skip_stale()
        return self._q[0] if self._q else None

    def pop(self) -> Request:
        self._skip_stale()
        req = self._q.popleft()
        self._live.discard(req.req_id)
        return req

    def discard(self, req: Request) -> None:
        self._live.discard(req.req_id)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        return (r for r in self._q if r.req_id in self._live and r.status in _WAITING)


class SpfQueue:
    """Shortest prompt (prompt + outputs so far, less a cached prefix) first; optionally paying tier first."""

    def __init__(self, user_priority: bool = True) -> None:
        self._user_priority = user_priority
        self._heap: list[tuple] = []  # (*sort key, order, request)
        self._live: dict[str, int] = {}  # req_id -> order of its live entry
        self._next = itertools.count()
        self._front = itertools.count(-1, -1)

    def _key(self, req: Request, order: int) -> tuple:
        """The heap entry: sort key first, then ``order`` and the request last."""
        tier = int(req.tier) if self._user_priority else 0
        return (tier, req.num_uncomputed_tokens, order, req)  # a cached prefix counts as done

    def push(self, req: Request) -> None:
        order = next(self._next)
        self._live[req.req_id] = order
        heapq.heappush(self._heap, self._key(req, order))

    def push_front(self, req: Request) -> None:
        order = next(self._front)
        self._live[req.req_id] = order
        heapq.heappush(self._heap, self._key(req, order))

    def _skip_stale(self) -> None:
        h = self._heap
        while h:
            order, req = h[0][-2], h[0][-1]
            if self._live.get(req.req_id) == order and req.status in _WAITING:
                return
            heapq.heappop(h)
            if self._live.get(req.req_id) == order:
                del self._live[req.req_id]

    def peek(self) -> Request | None:
        if not self._heap:
            return None  # (every step asks; the queue is often empty)
        self._skip_stale()
        return self._heap[0][-1] if self._heap else None

    def pop(self) -> Request:
        self._skip_stale()
        req = heapq.heappop(self._heap)[-1]
        del self._live[req.req_id]
        return req

    def discard(self, req: Request) -> None:
        self._live.pop(req.req_id, None)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        return (e[-1] for e in self._heap if self._live.get(e[-1].req_id) == e[-2] and e[-1].status in _WAITING)


class AgingSpfQueue(SpfQueue):
    """Shortest prompt first with aging: a request's length counts ``rate`` tokens
    less for every second it has waited.

    The key ``length + rate * arrival`` is static (every waiting request ages at
    the same rate), so the heap never needs re-sorting. A request can only be
    overtaken by requests arriving within ``length / rate`` seconds after it,
    which bounds its wait: SPF's low median without SPF's starvation of long prompts.
    """

    def __init__(self, user_priority: bool = True, rate_tokens_per_s: float = 2000.0) -> None:
        super().__init__(user_priority)
        self._rate = rate_tokens_per_s

    def _key(self, req: Request, order: int):
        tier = int(req.tier) if self._user_priority else 0
        return (tier, req.num_uncomputed_tokens + self._rate * req.arrival_s, order, req)


def make_waiting_queue(fcfs: bool, user_priority: bool) -> WaitingQueue:
    return FcfsQueue() if fcfs else SpfQueue(user_priority=user_priority)

"""DeadlineHeap: bulk pushes and pops return requests in exactly the order single pushes and pops would.

The simulator's speed-ups (docs/results.md, *Simulator speed*) rely on it: ``push_keyed`` may heapify or
keep a sorted list, and ``pop_live_n`` may sort and take everything, because entries are totally ordered
(key, arrival, unique ticket), so the order out depends only on what is in.
"""

from __future__ import annotations

import random

from scheduler_svc.core.policies.deadline_heap import DeadlineHeap
from scheduler_svc.core.request import RequestStatus
from tests.builders import make_request


def _running(n: int, seed: int):
    rng = random.Random(seed)
    reqs = [make_request(arrival_s=rng.choice([0.0, 1.0, 2.0])) for _ in range(n)]
    for r in reqs:
        r.status = RequestStatus.RUNNING
    keys = [rng.choice([0.5, 1.5, 2.5, rng.random()]) for _ in range(n)]  # ties on key and arrival included
    return reqs, keys


def _drain_one_by_one(h: DeadlineHeap) -> list[str]:
    out = []
    while h.peek() is not None:
        out.append(h.pop().req_id)
    return out


def test_bulk_push_and_pop_match_single_ones():
    for seed in range(20):
        reqs, keys = _running(40, seed)
        single, bulk = DeadlineHeap(), DeadlineHeap()
        # a few entries already in, then a bulk push (heapify, or in-order pushes when the heap holds more)
        for r, k in zip(reqs[:5], keys[:5]):
            single.push(r, k)
        bulk.push_keyed(reqs[:5], keys[:5])  # into an empty heap: kept sorted
        for r, k in zip(reqs[5:], keys[5:]):
            single.push(r, k)
        bulk.push_keyed(reqs[5:], keys[5:])
        # superseded and finished entries are skipped by both
        single.push(reqs[0], 9.0)
        bulk.push_keyed([reqs[0]], [9.0])
        reqs[1].status = RequestStatus.FINISHED_LENGTH
        single.discard(reqs[2])
        bulk.discard(reqs[2])
        expected = _drain_one_by_one(single)
        got = [r.req_id for r in bulk.pop_live_n(7)]  # a partial pop, then everything at once (one sort)
        got += [r.req_id for r in bulk.pop_live_n(1000)]
        assert got == expected, seed
        assert len(bulk) == 0 and bulk.peek() is None


def test_tbt_deadlines_and_the_sorted_fast_path_match_single_pushes():
    # push_tbt_deadlines keys each request base + tbt - minus (its own TBT objective, else the default);
    # a bulk push into an empty heap leaves it sorted, which a pop of everything then need not sort
    # again, unless something popped, pushed or superseded in between (the `_sorted` flag)
    for seed in range(20):
        reqs, _ = _running(30, seed)
        rng = random.Random(seed)
        for r in reqs:
            r.tbt_slo_s = rng.choice([None, 0.1, 0.2])
        base, dflt, minus = 10.0, 0.2, 0.03
        single, bulk = DeadlineHeap(), DeadlineHeap()
        for r in reqs:
            single.push(r, base + (r.tbt_slo_s if r.tbt_slo_s is not None else dflt) - minus)
        bulk.push_tbt_deadlines(reqs, base, dflt, minus)
        assert [(k, r.req_id) for k, r in [single.peek()]] == [(k, r.req_id) for k, r in [bulk.peek()]]
        first = [single.pop().req_id, single.pop().req_id]
        assert [bulk.pop().req_id, bulk.pop().req_id] == first  # pops break the sorted order ...
        single.push(reqs[-1], 0.0)  # ... and so do pushes and supersessions
        bulk.push(reqs[-1], 0.0)
        assert [r.req_id for r in bulk.pop_live_n(1000)] == _drain_one_by_one(single), seed
        # sorted by the bulk push, drained by one pop of everything
        again = DeadlineHeap()
        again.push_tbt_deadlines(reqs, base, dflt, minus)
        ref = DeadlineHeap()
        ref.push_keyed(reqs, [base + (r.tbt_slo_s if r.tbt_slo_s is not None else dflt) - minus for r in reqs])
        assert [r.req_id for r in again.pop_live_n(1000)] == _drain_one_by_one(ref), seed

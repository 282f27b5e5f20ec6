"""What both simulator event loops do with an arrival (simulator/sim.py, simulator/plan_ahead.py)."""

from __future__ import annotations

from simulator.workloads import WorkloadItem


def admit(it: WorkloadItem, t: float, route, on_token):
    """An arrival at ``t``: ``route(it)`` picks its executor (a ``SimExecutor``), whose core takes the
    request; a request the core ignores at once is reported to ``on_token`` as finished. Returns the
    executor, which the caller wakes if it is idle."""
    ex = route(it)
    ex.num_assigned += 1
    ex.tokens_assigned += it.prompt_len + it.output_len
    ev = ex.core.add(it.to_request(), t)
    if ev is not None:
        on_token(ev.req_id, t, 0, ev.finish_reason)
    return ex

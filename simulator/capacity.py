"""One simulated load point, and the capacity search over QPS.

Capacity = the highest QPS whose run meets the criterion (pooled median TTFT <
0.5 s, P99 TBT paying <= 0.1 s, free <= 0.5 s; every request finished: our
reading of the paper's "median TTFT below 0.5 s while meeting tail TBT"). The
search brackets the boundary (widening the upper end x2 while it passes),
then bisects until the bracket is narrower than ``tol`` (0.02 QPS). Besides the
last passing QPS it reports the binding constraint (the one that fails at the
first failing QPS) and a linear interpolation of that constraint's margin
between the last pass and the first fail.
"""

from __future__ import annotations

from typing import Any, Callable

from simulator.cli_args import RunSpec
from simulator.metrics import SloCriterion
from simulator.sim import simulate
from simulator.workloads import effective_qps


def run_point(policy: str, qps: float, spec: RunSpec, record_steps: bool = False,
              criterion: SloCriterion | None = None) -> dict[str, Any]:
    """Simulate ``policy`` at ``qps``; a flat summary dict (plus ``_steps`` when recorded)."""
    items = spec.workload(qps)
    res = simulate(policy, items, spec.cost_model, spec.num_blocks, spec.overrides, record_steps,
                   spec.max_sim_time)
    s: dict[str, Any] = {"policy": policy, "qps": qps, "effective_qps": effective_qps(items)}
    s.update(res.summary())
    s["num_requests"] = len(items)
    crit = criterion or SloCriterion()
    s["meets_slo"] = crit.passes(s)
    s["slo_margin"] = crit.margin(s)
    if record_steps:
        s["_steps"] = res.steps
    return s


def find_capacity(trial: Callable[[float], dict[str, Any]], criterion: SloCriterion, lo: float = 0.25,
                  hi: float = 4.0, tol: float = 0.02, max_qps: float = 64.0,
                  known: dict[float, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Bisection on QPS for the highest load that meets ``criterion``.

    ``trial(qps)`` returns a run summary. ``known``: summaries already computed
    (e.g. a QPS grid), used to narrow the bracket before any new run.
    """
    trials: list[dict[str, Any]] = []
    cache: dict[float, dict[str, Any]] = dict(known or {})

    def run(q: float) -> bool:
        q = round(q, 6)
        s = cache.get(q)
        reused = s is not None
        if s is None:
            s = trial(q)
            cache[q] = s
        ok = criterion.passes(s)
        trials.append({"qps": q, "passes": ok, "margin": criterion.margin(s), "reused": reused,
                       "ttft_p50_s": s.get("ttft_p50_s"), "tbt_p99_s_by_tier": s.get("tbt_p99_s_by_tier"),
                       "num_unfinished": s.get("num_unfinished")})
        return ok

    if known:  # narrow the bracket with the grid: last pass below the first fail
        qs = sorted(known)
        fails = [q for q in qs if not criterion.passes(known[q])]
        first_fail = fails[0] if fails else None
        passes = [q for q in qs if criterion.passes(known[q]) and (first_fail is None or q < first_fail)]
        if passes:
            lo = passes[-1]
        if first_fail is not None:
            hi = first_fail
        elif passes:
            hi = max(hi, 2 * lo)
    if not run(lo):
        # shrink towards 0 until something passes
        while lo > tol and not run(lo / 2):
            lo /= 2
        if lo <= tol:
            return _result(0.0, None, trials, criterion, cache)
        hi, lo = lo, lo / 2
    while run(hi):
        lo, hi = hi, hi * 2
        if hi > max_qps:
            return _result(lo, None, trials, criterion, cache)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return _result(lo, hi, trials, criterion, cache)


def _result(lo: float, hi: float | None, trials: list[dict[str, Any]], criterion: SloCriterion,
            cache: dict[float, dict[str, Any]]) -> dict[str, Any]:
    """Summarise a search; the binding constraint is the one that fails at the first failing QPS."""
    interp, binding = lo, None
    s_lo = cache.get(round(lo, 6)) if lo > 0 else None
    s_hi = cache.get(round(hi, 6)) if hi is not None else None
    if s_hi is not None:
        m_hi = criterion.margins(s_hi)
        binding = min(m_hi, key=m_hi.get)
        if s_lo is not None:
            a, b = criterion.margins(s_lo).get(binding), m_hi[binding]
            if a is not None and a >= 0 > b > -1e9:  # interpolate that constraint's margin linearly
                interp = lo + (hi - lo) * a / (a - b)
    elif s_lo is not None:
        m_lo = criterion.margins(s_lo)
        binding = min(m_lo, key=m_lo.get)
    return {"capacity_qps": lo, "first_failing_qps": hi, "capacity_qps_interpolated": interp,
            "binding_constraint": binding, "num_trials": sum(1 for t in trials if not t["reused"]),
            "trials": trials}

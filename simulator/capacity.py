"""One simulated load point, and the capacity search over QPS.

Capacity = the highest QPS whose run meets the criterion. Two criteria
(simulator/metrics.py):

* **paper**: pooled median TTFT < 0.5 s, P99 TBT paying <= 0.1 s, free <= 0.5 s,
  every request finished (our reading of the paper's "median TTFT below 0.5 s
  while meeting tail TBT"). Over a finite run it can be passed by starving long
  prompts and draining the backlog after the arrivals stop;
* **stable** (the default): the paper's objectives, also over the steady-state
  window, a TTFT tail (P99 <= 10 s; per tier where the tier has a TTFT
  objective), and the system keeps up (bounded drain, or throughput >= 97% of
  the offered rate).

:func:`find_capacities` searches both on one cache of runs (the stable search
first; every stable pass is a paper pass, so the paper search mostly reuses its
runs). The search brackets the boundary (widening the upper end x2 while it
passes), then bisects until the bracket is narrower than ``tol`` (0.02 QPS).
Besides the last passing QPS it reports the binding constraint (the one that
fails at the first failing QPS) and a linear interpolation of that constraint's
margin between the last pass and the first fail.
"""

from __future__ import annotations

from typing import Any, Callable

from simulator.cli_args import RunSpec
from simulator.metrics import SloCriterion, StableCriterion

Criterion = SloCriterion | StableCriterion
from simulator.sim import simulate
from simulator.workloads import effective_qps


def run_point(policy: str, qps: float, spec: RunSpec, record_steps: bool = False,
              criterion: Criterion | None = None) -> dict[str, Any]:
    """Simulate ``policy`` at ``qps``; a flat summary dict (plus ``_steps`` when recorded).

    ``meets_slo`` / ``slo_margin`` are ``criterion``'s; with a :class:`StableCriterion`
    ``meets_slo_paper`` and ``meets_slo_stable`` say which of the two the run passes.
    """
    items = spec.workload(qps)
    res = simulate(policy, items, spec.cost_model, spec.num_blocks, spec.overrides, record_steps,
                   spec.max_sim_time, spec.steady_fraction)
    s: dict[str, Any] = {"policy": policy, "qps": qps, "effective_qps": effective_qps(items)}
    s.update(res.summary())
    s["num_requests"] = len(items)
    crit = criterion or SloCriterion()
    s["meets_slo"] = crit.passes(s)
    s["slo_margin"] = crit.margin(s)
    if isinstance(crit, StableCriterion):
        s["meets_slo_paper"] = crit.paper.passes(s)
        s["meets_slo_stable"] = s["meets_slo"]
    if record_steps:
        s["_steps"] = res.steps
    return s


def find_capacities(trial: Callable[[float], dict[str, Any]], stable: StableCriterion, lo: float = 0.25,
                    hi: float = 4.0, tol: float = 0.02,
                    known: dict[float, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Both capacities of one policy on one cache of runs: ``{"stable": ..., "paper": ...}``."""
    cache: dict[float, dict[str, Any]] = dict(known or {})
    res_stable = find_capacity(trial, stable, lo, hi, tol, known=known, cache=cache)
    res_paper = find_capacity(trial, stable.paper, lo, hi, tol, known=dict(cache), cache=cache)
    return {"stable": res_stable, "paper": res_paper}


def find_capacity(trial: Callable[[float], dict[str, Any]], criterion: Criterion, lo: float = 0.25,
                  hi: float = 4.0, tol: float = 0.02, max_qps: float = 64.0,
                  known: dict[float, dict[str, Any]] | None = None,
                  cache: dict[float, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Bisection on QPS for the highest load that meets ``criterion``.

    ``trial(qps)`` returns a run summary. ``known``: summaries already computed
    (e.g. a QPS grid), used to narrow the bracket before any new run. ``cache``:
    a dict of summaries by QPS that this search reads and adds to (to share runs
    between searches).
    """
    trials: list[dict[str, Any]] = []
    if cache is None:
        cache = {}
    cache.update(known or {})

    def run(q: float) -> bool:
        q = round(q, 6)
        s = cache.get(q)
        reused = s is not None
        if s is None:
            s = trial(q)
            cache[q] = s
        ok = criterion.passes(s)
        trials.append({"qps": q, "passes": ok, "margin": criterion.margin(s), "reused": reused,
                       "ttft_p50_s": s.get("ttft_p50_s"), "ttft_p99_s": s.get("ttft_p99_s"),
                       "tbt_p99_s_by_tier": s.get("tbt_p99_s_by_tier"), "drain_s": s.get("drain_s"),
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
            hi = hi if hi > lo else 2 * lo  # keep the caller's bracket; the search doubles it while it passes
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


def _result(lo: float, hi: float | None, trials: list[dict[str, Any]], criterion: Criterion,
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
    at = {k: s_lo.get(k) for k in AT_CAPACITY_KEYS} if s_lo is not None else {}
    return {"criterion": criterion.name, "capacity_qps": lo, "first_failing_qps": hi,
            "capacity_qps_interpolated": interp, "binding_constraint": binding,
            "num_trials": sum(1 for t in trials if not t["reused"]), "at_capacity": at, "trials": trials}


# what a capacity result reports of its last passing run
AT_CAPACITY_KEYS = ("ttft_p50_s", "ttft_p99_s", "ttft_p99_s_by_tier", "tbt_p99_s_by_tier", "drain_s",
                    "throughput_ratio", "steady")

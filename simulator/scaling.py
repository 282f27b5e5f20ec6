"""Capacity scaling efficiency of P pools x E executors, per gateway routing rule.

``efficiency = capacity(P x E executors) / (P x E x capacity(one executor))``, each
capacity found by :func:`simulator.capacity.find_capacity` (bisection on QPS)
under the criterion that ``slai-serve capacity`` uses by default (its criterion
options are accepted here unchanged). The cluster runs are
:class:`simulator.cluster.PoolClusterSimulator`: gateways route to pools by
``--pool-routings`` (jsw, p2c, round-robin) on loads published every
``--load-refresh-s``; each pool's scheduler routes to its executors by ``--routing``.

One executor's capacity depends on the run's length (a short run drains its
backlog after the arrivals stop), so it is measured at each of
``--baseline-requests``: by default ``--num-requests / (P x E)`` requests, the same
simulated duration and requests per executor as the cluster run, and
``--num-requests``, the same request count.

The search never goes above ``--max-qps-per-executor`` (default: the stability
bound, above which no policy keeps up, docs/rad.md): over a short run the
paper's median-TTFT criterion can pass there anyway (SLAI serves short prompts
first and the long ones drain after the arrivals stop, docs/results.md), and
such a pass is reported as ``capped`` (capacity >= the bound) rather than as a
number above it.

Everything runs in this one process, one trial after another (they are long:
a 64-executor trial costs as much as a one-executor trial with the same number
of requests). Progress goes to stderr; ``--out FILE`` is rewritten after each search.

    python -m simulator.scaling --trace paper --pools 8 --executors-per-pool 8 --num-requests 8192
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from scheduler_svc.core.policies.registry import POLICIES
from scheduler_svc.core.router import Router
from simulator.capacity import find_capacity, run_point
from simulator.capacity_cli import add_criterion_arguments, criterion_from_args
from simulator.cli_args import (
    RunSpec,
    add_workload_arguments,
    clean_json,
    stability_bound,
)
from simulator.cluster import POOL_ROUTINGS, run_cluster_point


def _logged(name: str, trial: Callable[[float], dict[str, Any]], crit: Any) -> Callable[[float], dict[str, Any]]:
    def run(q: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        s = trial(q)
        print(f"[{name}] qps {q:.3f} {'pass' if crit.passes(s) else 'FAIL'} ttft_p50 {s.get('ttft_p50_s')} "
              f"ttft_p99 {s.get('ttft_p99_s')} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        return s
    return run


def _search(name: str, trial: Callable[[float], dict[str, Any]], crit: Any, lo: float, hi: float,
            tol: float, max_qps: float) -> dict[str, Any]:
    """``find_capacity`` with the upper end clipped to ``max_qps``; ``capped``: it passed there."""
    t0 = time.perf_counter()
    hi = min(hi, max_qps)
    lo = lo if lo < hi else hi / 2
    res = find_capacity(_logged(name, trial, crit), crit, lo=lo, hi=hi, tol=tol, max_qps=max_qps)
    res["capped"] = res["first_failing_qps"] is None
    res["wall_s"] = time.perf_counter() - t0
    return res


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulator.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="slai", choices=list(POLICIES))
    p.add_argument("--pools", type=int, default=8)
    p.add_argument("--executors-per-pool", type=int, default=8)
    p.add_argument("--pool-routings", default=",".join(POOL_ROUTINGS),
                   help="comma-separated gateway rules (default %(default)s)")
    p.add_argument("--routing", default="least-work", help="each pool's scheduler's rule (default %(default)s)")
    p.add_argument("--load-refresh-s", type=float, default=0.1,
                   help="how often pools publish their load to the gateways, s (0 = exact; default %(default)s)")
    p.add_argument("--gateways", type=int, default=1, help="gateways, arrivals spread in rotation (default 1)")
    p.add_argument("--baseline-requests", default=None,
                   help="comma-separated request counts for one executor's capacity "
                        "(default: num-requests / executors, and num-requests)")
    p.add_argument("--lo", type=float, default=2.6, help="initial lower bracket, QPS PER EXECUTOR")
    p.add_argument("--hi", type=float, default=3.3, help="initial upper bracket, QPS PER EXECUTOR")
    p.add_argument("--tol", type=float, default=0.05, help="bracket width to stop at, QPS PER EXECUTOR")
    p.add_argument("--max-qps-per-executor", type=float, default=None,
                   help="never search above this (default: the stability bound, above which no policy is "
                        "stable, docs/rad.md; a search that passes there reports it as a capped capacity)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the JSON result here (after each search)")
    add_workload_arguments(p, num_requests=8192)
    add_criterion_arguments(p)
    a = p.parse_args(argv)
    for name, v in (("--pools", a.pools), ("--executors-per-pool", a.executors_per_pool), ("--gateways", a.gateways)):
        if v < 1:
            p.error(f"{name} must be >= 1, got {v}")
    if not a.load_refresh_s >= 0:
        p.error(f"--load-refresh-s must be >= 0, got {a.load_refresh_s}")
    if not 0 < a.lo < a.hi or a.tol <= 0:
        p.error("need 0 < --lo < --hi and --tol > 0")
    rules = _csv(a.pool_routings)
    for r in rules:
        if r not in POOL_ROUTINGS:
            p.error(f"--pool-routings: {r!r} is not one of {', '.join(POOL_ROUTINGS)}")
    Router(a.routing)  # fail fast on a bad in-pool rule
    spec = RunSpec.from_args(a)
    crit = criterion_from_args(a)
    n_exec = a.pools * a.executors_per_pool
    try:
        base_counts = ([int(x) for x in _csv(a.baseline_requests)] if a.baseline_requests
                       else sorted({max(1, a.num_requests // n_exec), a.num_requests}))
    except ValueError:
        p.error(f"--baseline-requests: comma-separated integers, got {a.baseline_requests!r}")

    bound = stability_bound(spec, a.policy)["lambda_max_nominal_qps"]
    cap = a.max_qps_per_executor or bound
    out: dict[str, Any] = {"policy": a.policy, "pools": a.pools, "executors_per_pool": a.executors_per_pool,
                           "executors": n_exec, "routing_in_pool": a.routing, "load_refresh_s": a.load_refresh_s,
                           "gateways": a.gateways, "criterion": getattr(crit, "name", type(crit).__name__),
                           "stability_bound_per_executor": bound, "max_qps_per_executor": cap,
                           "baseline": {}, "cluster": {}, **spec.describe()}

    def save() -> None:
        if a.out:
            with open(a.out, "w") as fh:
                json.dump(clean_json(out), fh, sort_keys=True, indent=1)
                fh.write("\n")

    def baseline(n: int) -> None:
        spec_n = replace(spec, num_requests=n)
        out["baseline"][str(n)] = _search(f"1 executor, {n} requests",
                                          lambda q: run_point(a.policy, q, spec_n, criterion=crit),
                                          crit, a.lo, a.hi, a.tol, cap)

    def efficiencies() -> None:
        for r in out["cluster"].values():
            r["efficiency"] = {n: r["capacity_qps"] / (n_exec * b["capacity_qps"]) if b["capacity_qps"] else None
                               for n, b in out["baseline"].items()}
        save()

    # the short baseline first (cheap), then the clusters, then the long baselines
    short = [n for n in base_counts if n * n_exec <= a.num_requests]
    for n in short:
        baseline(n)
        save()
    for rule in rules:
        res = _search(f"{a.pools}x{a.executors_per_pool} {rule}",
                      lambda q, r=rule: run_cluster_point(a.policy, q, spec, n_exec, a.routing, crit, a.pools, r,
                                                          a.load_refresh_s, a.gateways),
                      crit, a.lo * n_exec, a.hi * n_exec, a.tol * n_exec, cap * n_exec)
        res["capacity_qps_per_executor"] = res["capacity_qps"] / n_exec
        out["cluster"][rule] = res
        efficiencies()
    for n in base_counts:
        if n not in short:
            baseline(n)
            efficiencies()
    print(table(out))
    return 0


def table(out: dict[str, Any]) -> str:
    """Markdown: one row per gateway rule; efficiency against each baseline."""
    base = out["baseline"]
    head = ("| gateway rule | capacity, total QPS (per executor) | "
            + " | ".join(f"efficiency vs 1 executor @ {n} requests ({'>= ' if b.get('capped') else ''}"
                         f"{b['capacity_qps']:.3f} QPS)"
                         for n, b in base.items()) + " | binding | trials |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rule, r in out["cluster"].items():
        eff = " | ".join("-" if r.get("efficiency", {}).get(n) is None else f"{100 * r['efficiency'][n]:.1f}%" for n in base)
        ge = ">= " if r.get("capped") else ""
        lines.append(f"| {rule} | {ge}{r['capacity_qps']:.1f} ({r['capacity_qps_per_executor']:.3f}) | {eff} | "
                     f"{r['binding_constraint']} | {r['num_trials']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""K executors behind one router, in one virtual clock (RAD's join-shortest-work across executors).

Each executor owns a ``SchedulerCore`` (same policy, same cost model, its own KV
pool). All of them run in the simulator's one event loop (:func:`simulator.sim.run_events`:
``schedule(now)`` -> cost model -> ``update(plan, result, now + dt)`` at the
step-end event, one heap keyed ``(time, kind, seq)``); this module adds only the
routing, so with ``K = 1`` the run is the single-executor simulator.

Each arrival is routed once, at admission, by the live service's router
(:class:`scheduler_svc.core.router.Router`, pure stdlib, reused unchanged):

* ``least-work``: the executor with the least ``core.outstanding_tokens()``
  (uncomputed prompt + remaining outputs), ties by request count then index;
  RAD's join-shortest-work rule;
* ``round-robin``: blind rotation;
* ``power-of-two``: two executors drawn with a seeded RNG, the one with less work.

Pools (``pools > 1``): the executors are split into equal pools (one scheduler each, docs/gateway.md
"Pools"); an arrival first goes to a pool by the gateway's rule (``jsw``: least outstanding work summed
over the pool's executors; ``p2c``; ``round-robin``), then to an executor inside it by ``routing`` (the
scheduler's rule). The gateway is taken to see each pool's load fresh (the scheduler publishes it on
every Session message, i.e. every step). ``--scaling`` reports capacity scaling efficiency:
capacity / (executors x one executor's capacity), per pool rule.

Metrics: one pooled :class:`simulator.metrics.MetricsCollector` (same definitions as
the single-executor runs). ``python -m simulator.cluster`` runs a grid
(policies x routings x QPS) on worker processes; ``slai-serve sim --executors K
--routing NAME`` runs one point.

No grpc or torch here.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from contract.cost_models import PAPER_MODEL, CostModel
from scheduler_svc.core import SchedulerCore
from scheduler_svc.core.router import Router
from simulator.metrics import MetricsCollector, SloCriterion
from simulator.sim import SimExecutor, build_core, prefix_cache_summary, run_events
from simulator.workloads import WorkloadItem, effective_qps

ROUTINGS = ("round-robin", "least-work", "power-of-two")
# the gateway's pool rules (gateway/pools.py) as the core Router's names
POOL_ROUTINGS = {"jsw": "least-work", "p2c": "power-of-two", "round-robin": "round-robin"}


class SimPool:
    """One pool as a gateway sees it: its executors' outstanding work and requests, summed."""

    __slots__ = ("executors", "index", "router")

    def __init__(self, index: int, executors: list[SimExecutor], router: Router) -> None:
        self.index = index
        self.executors = executors
        self.router = router  # the pool's scheduler's own rule, across its executors

    @property
    def work(self) -> int:
        return sum(e.work for e in self.executors)

    @property
    def num_requests(self) -> int:
        return sum(e.num_requests for e in self.executors)


@dataclass(slots=True)
class ClusterResult:
    policy: str
    routing: str
    metrics: MetricsCollector
    executors: list[SimExecutor]
    sim_time_s: float
    wall_time_s: float
    stalled: bool
    pools: int = 1
    pool_routing: str = ""
    # per arrival: (chosen executor, outstanding tokens of every executor just before the choice)
    decisions: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    def imbalance(self) -> dict[str, float]:
        """Outstanding-work spread seen at arrivals: mean of (max - min) and of max / mean."""
        if not self.decisions:
            return {"work_spread_mean_tokens": 0.0, "work_max_over_mean": 1.0}
        spread = [max(w) - min(w) for _, w in self.decisions]
        ratio = [max(w) / (sum(w) / len(w)) for _, w in self.decisions if sum(w) > 0]
        return {"work_spread_mean_tokens": sum(spread) / len(spread),
                "work_max_over_mean": sum(ratio) / len(ratio) if ratio else 1.0}

    def summary(self) -> dict[str, Any]:
        s = self.metrics.summary()
        steps = sum(e.core.num_steps for e in self.executors)
        busy = sum(e.busy_time_s for e in self.executors)
        s.update(
            policy=self.policy, routing=self.routing, executors=len(self.executors), pools=self.pools,
            pool_routing=self.pool_routing,
            num_steps=steps,
            num_preemptions=sum(e.core.num_preemptions for e in self.executors),
            busy_fraction=busy / (self.sim_time_s * len(self.executors)) if self.sim_time_s > 0 else None,
            busy_fraction_by_executor=[e.busy_time_s / self.sim_time_s if self.sim_time_s > 0 else None
                                       for e in self.executors],
            requests_by_executor=[e.num_assigned for e in self.executors],
            tokens_by_executor=[e.tokens_assigned for e in self.executors],
            kv_used_max=max((e.kv_used_max for e in self.executors), default=0.0),
            sim_time_s=self.sim_time_s, wall_time_s=self.wall_time_s,
            sim_speed=self.sim_time_s / self.wall_time_s if self.wall_time_s > 0 else None,
            stalled=self.stalled,
        )
        s.update(prefix_cache_summary([e.core for e in self.executors]))
        s.update(self.imbalance())
        return s


class ClusterSimulator:
    """One heap, K cores; arrivals routed by ``Router(routing, seed)``."""

    def __init__(self, cores: list[SchedulerCore], routing: str = "least-work", cost_model: CostModel = PAPER_MODEL,
                 policy: str = "", seed: int = 0, max_sim_time_s: float | None = None,
                 record_decisions: bool = True, pools: int = 1, pool_routing: str = "jsw") -> None:
        if not cores:
            raise ValueError("need at least one executor")
        if pools < 1 or len(cores) % pools:
            raise ValueError(f"pools must divide the executors evenly, got {pools} pools for {len(cores)} executors")
        if pool_routing not in POOL_ROUTINGS:
            raise ValueError(f"pool routing must be one of {', '.join(POOL_ROUTINGS)}, got {pool_routing!r}")
        self.executors = [SimExecutor(i, c) for i, c in enumerate(cores)]
        self.router = Router(routing, seed)
        size = len(cores) // pools
        self.pools = [SimPool(p, self.executors[p * size:(p + 1) * size], Router(routing, seed + 1 + p))
                      for p in range(pools)] if pools > 1 else []
        self.pool_router = Router(POOL_ROUTINGS[pool_routing], seed + 1000)
        self.pool_routing = pool_routing if pools > 1 else ""
        self.routing = routing
        self.cost = cost_model
        self.policy = policy or cores[0].policy.name
        self.max_sim_time_s = max_sim_time_s
        self.record_decisions = record_decisions
        self.now = 0.0
        self.metrics = MetricsCollector()

    def run(self, items: list[WorkloadItem]) -> ClusterResult:
        execs, router = self.executors, self.router
        decisions: list[tuple[int, tuple[int, ...]]] = []

        if self.pools:
            pools, pool_router = self.pools, self.pool_router

            def pick(execs: list[SimExecutor]) -> SimExecutor:
                pool = pool_router.pick(pools)  # the gateway's choice, then the pool's scheduler's
                return pool.router.pick(pool.executors)
        else:
            pick = router.pick

        def route(it: WorkloadItem) -> SimExecutor:
            if not self.record_decisions:
                return pick(execs)
            works = tuple(e.work for e in execs)
            ex = pick(execs)
            decisions.append((ex.index, works))
            return ex

        items = sorted(items, key=lambda it: it.arrival_s)
        self.now, wall, stalled = run_events(execs, items, self.cost, self.metrics, route, self.max_sim_time_s)
        return ClusterResult(policy=self.policy, routing=self.routing, metrics=self.metrics, executors=execs,
                             sim_time_s=self.now, wall_time_s=wall, stalled=stalled, decisions=decisions,
                             pools=max(1, len(self.pools)), pool_routing=self.pool_routing)


def simulate_cluster(policy: str, items: list[WorkloadItem], executors: int = 4, routing: str = "least-work",
                     cost_model: CostModel = PAPER_MODEL, num_blocks: int = 14733,
                     overrides: list[str] | tuple[str, ...] = (), seed: int = 0,
                     max_sim_time_s: float | None = None, record_decisions: bool = True, pools: int = 1,
                     pool_routing: str = "jsw") -> ClusterResult:
    """Run ``items`` through ``executors`` fresh cores running ``policy`` (``num_blocks`` KV blocks each),
    split into ``pools`` pools routed by ``pool_routing`` (``jsw``, ``p2c``, ``round-robin``)."""
    cores = [build_core(policy, num_blocks, overrides) for _ in range(executors)]
    return ClusterSimulator(cores, routing, cost_model, policy, seed, max_sim_time_s, record_decisions,
                            pools, pool_routing).run(items)


def run_cluster_point(policy: str, qps: float, spec: Any, executors: int, routing: str,
                      criterion: SloCriterion | None = None, pools: int = 1,
                      pool_routing: str = "jsw") -> dict[str, Any]:
    """Like ``simulator.capacity.run_point`` for a cluster: ``qps`` is the TOTAL nominal arrival rate."""
    items = spec.workload(qps)
    res = simulate_cluster(policy, items, executors, routing, spec.cost_model, spec.num_blocks, spec.overrides,
                           seed=spec.seed, max_sim_time_s=spec.max_sim_time,
                           pools=pools, pool_routing=pool_routing)
    s: dict[str, Any] = {"policy": policy, "qps": qps, "qps_per_executor": qps / executors,
                         "effective_qps": effective_qps(items)}
    s.update(res.summary())
    s["num_requests"] = len(items)
    crit = criterion or SloCriterion()
    s["meets_slo"] = crit.passes(s)
    s["slo_margin"] = crit.margin(s)
    return s


# ---------------------------------------------------------------- grid CLI: python -m simulator.cluster
def _grid_point(args: tuple) -> dict[str, Any]:
    policy, qps, spec, k, routing = args
    return run_cluster_point(policy, qps, spec, k, routing)


def _capacity(args: tuple) -> dict[str, Any]:
    """Bisection on TOTAL QPS for one (policy, routing), narrowed by the grid's points."""
    from simulator.capacity import find_capacity

    policy, routing, spec, k, known, tol = args
    crit = SloCriterion()
    res = find_capacity(lambda q: run_cluster_point(policy, q, spec, k, routing, crit), crit,
                        lo=min(known), hi=max(known), tol=tol, known=known)
    res.pop("trials")
    return {"policy": policy, "routing": routing, "executors": k, **res,
            "capacity_qps_per_executor": res["capacity_qps"] / k}


def _fmt(v: Any, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| policy | QPS total (per exec.) | routing | TTFT p50 (s) | TTFT p99 (s) | TBT p99 paying (s) "
            "| TBT p99 free (s) | meets SLO | work spread (tokens) | max/mean work | tokens per executor (k) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in rows:
        tbt = s.get("tbt_p99_s_by_tier", {})
        toks = "/".join(f"{t / 1000:.0f}" for t in s["tokens_by_executor"])
        lines.append(f"| {s['policy']} | {s['qps']:.2f} ({s['qps_per_executor']:.2f}) | {s['routing']} | "
                     f"{_fmt(s['ttft_p50_s'])} | {_fmt(s['ttft_p99_s'])} | {_fmt(tbt.get('paying'))} | "
                     f"{_fmt(tbt.get('free'))} | {'yes' if s['meets_slo'] else 'no'} | "
                     f"{s['work_spread_mean_tokens']:.0f} | {s['work_max_over_mean']:.2f} | {toks} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from simulator.cli_args import RunSpec, add_workload_arguments, clean_json

    p = argparse.ArgumentParser(prog="python -m simulator.cluster", description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="slai,rad", help="comma-separated policies (default %(default)s)")
    p.add_argument("--routings", default=",".join(ROUTINGS), help="comma-separated routings (default all)")
    p.add_argument("--executors", type=int, default=4)
    p.add_argument("--qps", default="9.6,10.8", help="comma-separated TOTAL nominal QPS values")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--capacity", action="store_true",
                   help="also bisect the total QPS that meets the SLO criterion, per (policy, routing)")
    p.add_argument("--tol", type=float, default=0.05, help="capacity bracket width, total QPS (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print a JSON list of summaries (default: a table)")
    add_workload_arguments(p, num_requests=4096)
    a = p.parse_args(argv)
    spec = RunSpec.from_args(a)
    pts = [(pol, float(q), spec, a.executors, r) for pol in a.policies.split(",") for q in a.qps.split(",")
           for r in a.routings.split(",")]
    for r in {pt[4] for pt in pts}:
        Router(r)  # fail fast on a bad name
    with ProcessPoolExecutor(max(1, a.jobs)) as pool:
        rows = list(pool.map(_grid_point, pts))
        caps: list[dict[str, Any]] = []
        if a.capacity:
            combos = sorted({(r["policy"], r["routing"]) for r in rows}, key=str)
            jobs = [(pol, rt, spec, a.executors, {r["qps"]: r for r in rows
                                                  if (r["policy"], r["routing"]) == (pol, rt)}, a.tol)
                    for pol, rt in combos]
            caps = list(pool.map(_capacity, jobs))
    if a.json:
        json.dump(clean_json({"points": rows, "capacity": caps}), sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(table(rows))
        for c in caps:
            print(f"capacity {c['policy']:6s} {c['routing']:13s} {c['capacity_qps']:.3f} total QPS "
                  f"({c['capacity_qps_per_executor']:.3f} per executor), binding {c['binding_constraint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

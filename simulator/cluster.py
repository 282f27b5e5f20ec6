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

**Pools** (:class:`PoolClusterSimulator`): P pools x E executors. A pool is one
scheduler process and its executors (docs/results.md, "Pools behind gateways"); stateless
gateways route each arrival to a pool, then the pool's own ``Router`` (the rule
above) picks the executor. Gateway rules (the live gateway's names, gateway/'s
``--pool-routing``), on the same ``Router``:

* ``jsw``: the pool with the least outstanding work *as the gateway sees it*:
  the load the pool last published plus the tokens this gateway sent it since
  (what the live gateway does). Pools publish every ``load_refresh_s`` seconds,
  staggered (pool p at ``p / P`` of the period); ``load_refresh_s = 0`` = the
  exact, instantaneous load. A publish is taken at the first routing decision
  at or after its instant (the loop has no timer events), so its value can be
  newer than its instant by at most one inter-arrival gap;
* ``p2c``: two pools drawn with a seeded RNG, the one that looks less loaded;
* ``round-robin``: blind rotation.

Arrivals are spread over ``gateways`` gateways in rotation (an L4 balancer in
front); each has its own rotation / RNG and counts only what it sent itself.
With P = 1 the gateway has one choice and the run is :class:`ClusterSimulator`'s,
event for event (tested).

Metrics: one pooled :class:`simulator.metrics.MetricsCollector` (same definitions as
the single-executor runs). ``python -m simulator.cluster`` runs a grid
(policies x routings x QPS) on worker processes; ``slai-serve sim --executors K
--routing NAME [--pools P --pool-routing RULE]`` runs one point;
``python -m simulator.scaling`` measures capacity scaling efficiency.

No grpc or torch here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from contract.cost_models import PAPER_MODEL, CostModel
from scheduler_svc.core import SchedulerCore
from scheduler_svc.core.router import Router
from simulator.metrics import MetricsCollector, SloCriterion, steady_window_start
from simulator.sim import SimExecutor, build_core, prefix_cache_summary, run_events
from simulator.workloads import WorkloadItem, effective_qps

ROUTINGS = ("round-robin", "least-work", "power-of-two")
# gateway-level rule (the live gateway's names) -> the Router kind that implements it
POOL_ROUTINGS = {"jsw": "least-work", "p2c": "power-of-two", "round-robin": "round-robin"}


@dataclass(slots=True)
class ClusterResult:
    policy: str
    routing: str
    metrics: MetricsCollector
    executors: list[SimExecutor]
    sim_time_s: float
    wall_time_s: float
    stalled: bool
    # per arrival: (chosen executor, outstanding tokens of every executor just before the choice)
    decisions: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    pools: list[SimPool] | None = None  # set by PoolClusterSimulator
    pool_routing: str | None = None
    load_refresh_s: float = 0.0
    gateways: int = 1
    # per arrival: (chosen pool, exact outstanding tokens of every pool, the same as the gateway saw them)
    pool_decisions: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

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
            policy=self.policy, routing=self.routing, executors=len(self.executors),
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
        if self.pools is not None:
            s.update(self.pool_summary())
        return s

    def pool_summary(self) -> dict[str, Any]:
        """Per-pool shares, the spread of exact pool work at arrivals, and how far the gateways' view was off."""
        pools, dec = self.pools or [], self.pool_decisions
        out: dict[str, Any] = {
            "pools": len(pools), "executors_per_pool": len(pools[0].executors) if pools else 0,
            "pool_routing": self.pool_routing, "load_refresh_s": self.load_refresh_s, "gateways": self.gateways,
            "requests_by_pool": [sum(e.num_assigned for e in p.executors) for p in pools],
            "tokens_by_pool": [sum(e.tokens_assigned for e in p.executors) for p in pools],
            "pool_work_spread_mean_tokens": 0.0, "pool_load_error_mean_tokens": 0.0}
        if dec:
            out["pool_work_spread_mean_tokens"] = sum(max(w) - min(w) for _, w, _ in dec) / len(dec)
            out["pool_load_error_mean_tokens"] = sum(
                sum(abs(a - b) for a, b in zip(w, seen)) / len(w) for _, w, seen in dec) / len(dec)
        return out


class ClusterSimulator:
    """One heap, K cores; arrivals routed by ``Router(routing, seed)``."""

    def __init__(self, cores: list[SchedulerCore], routing: str = "least-work", cost_model: CostModel = PAPER_MODEL,
                 policy: str = "", seed: int = 0, max_sim_time_s: float | None = None,
                 record_decisions: bool = True) -> None:
        if not cores:
            raise ValueError("need at least one executor")
        self.executors = [SimExecutor(i, c) for i, c in enumerate(cores)]
        self.router = Router(routing, seed)
        self.routing = routing
        _init_run_state(self, cost_model, policy or cores[0].policy.name, max_sim_time_s, record_decisions)

    def run(self, items: list[WorkloadItem]) -> ClusterResult:
        execs, router = self.executors, self.router
        decisions: list[tuple[int, tuple[int, ...]]] = []

        def route(it: WorkloadItem) -> SimExecutor:
            if not self.record_decisions:
                return router.pick(execs)
            works = tuple(e.work for e in execs)
            ex = router.pick(execs)
            decisions.append((ex.index, works))
            return ex

        items = sorted(items, key=lambda it: it.arrival_s)
        _set_steady_window(self.metrics, items, self.steady_fraction)
        self.now, wall, stalled = run_events(execs, items, self.cost, self.metrics, route, self.max_sim_time_s)
        return ClusterResult(policy=self.policy, routing=self.routing, metrics=self.metrics, executors=execs,
                             sim_time_s=self.now, wall_time_s=wall, stalled=stalled, decisions=decisions)


def _init_run_state(sim: Any, cost_model: CostModel, policy: str, max_sim_time_s: float | None,
                    record_decisions: bool) -> None:
    """What both cluster simulators hold besides their executors and routers."""
    sim.cost = cost_model
    sim.policy = policy
    sim.max_sim_time_s = max_sim_time_s
    sim.record_decisions = record_decisions
    sim.now = 0.0
    sim.metrics = MetricsCollector()
    # the stable criterion's steady-state window, as in the one-executor Simulator (simulator/sim.py)
    sim.steady_fraction = 0.5


def _set_steady_window(metrics: MetricsCollector, items: list[WorkloadItem], fraction: float | None) -> None:
    if fraction is not None:
        metrics.steady_from_s = steady_window_start((it.arrival_s for it in items), fraction)


def simulate_cluster(policy: str, items: list[WorkloadItem], executors: int = 4, routing: str = "least-work",
                     cost_model: CostModel = PAPER_MODEL, num_blocks: int = 14733,
                     overrides: list[str] | tuple[str, ...] = (), seed: int = 0,
                     max_sim_time_s: float | None = None, record_decisions: bool = True) -> ClusterResult:
    """Run ``items`` through ``executors`` fresh cores running ``policy`` (``num_blocks`` KV blocks each)."""
    cores = [build_core(policy, num_blocks, overrides) for _ in range(executors)]
    return ClusterSimulator(cores, routing, cost_model, policy, seed, max_sim_time_s, record_decisions).run(items)


class SimPool:
    """One pool: its executors, its scheduler's ``Router``, and the load it last published to the gateways."""

    __slots__ = (
        "executors",
        "index",
        "next_publish_s",
        "phase_s",
        "published_requests",
        "published_work",
        "router",
    )

    def __init__(self, index: int, executors: list[SimExecutor], router: Router, phase_s: float) -> None:
        self.index = index
        self.executors = executors
        self.router = router
        self.phase_s = phase_s  # publishes at phase_s + k * period
        self.next_publish_s = phase_s
        self.published_work = 0
        self.published_requests = 0

    @property
    def work(self) -> int:  # exact outstanding tokens (what the scheduler's ledger holds)
        return sum(e.work for e in self.executors)

    @property
    def num_requests(self) -> int:
        return sum(e.num_requests for e in self.executors)

    def publish(self, now: float, period_s: float) -> None:
        self.published_work, self.published_requests = self.work, self.num_requests
        self.next_publish_s = self.phase_s + period_s * (math.floor((now - self.phase_s) / period_s) + 1)


class _PoolView:
    """A pool as one gateway sees it (``Routable`` for the gateway's ``Router``)."""

    __slots__ = ("index", "num_requests", "work")

    def __init__(self, index: int) -> None:
        self.index, self.work, self.num_requests = index, 0, 0


class _SimGateway:
    """One stateless gateway: its own rule state, and what it sent each pool since that pool's last publish."""

    __slots__ = ("router", "sent_requests", "sent_work", "views")

    def __init__(self, kind: str, seed: int, num_pools: int) -> None:
        self.router = Router(kind, seed)
        self.views = [_PoolView(i) for i in range(num_pools)]
        self.sent_work = [0] * num_pools
        self.sent_requests = [0] * num_pools


class PoolClusterSimulator:
    """P pools x E executors in one heap: gateway rule across pools, each pool's ``Router`` inside it."""

    def __init__(self, pools: list[list[SchedulerCore]], routing: str = "least-work", pool_routing: str = "jsw",
                 load_refresh_s: float = 0.1, gateways: int = 1, cost_model: CostModel = PAPER_MODEL,
                 policy: str = "", seed: int = 0, max_sim_time_s: float | None = None,
                 record_decisions: bool = True) -> None:
        if not pools or any(not cores for cores in pools):
            raise ValueError("need at least one pool, each with at least one executor")
        if pool_routing not in POOL_ROUTINGS:
            raise ValueError(f"pool_routing must be one of {', '.join(POOL_ROUTINGS)}, got {pool_routing!r}")
        if not (math.isfinite(load_refresh_s) and load_refresh_s >= 0):
            raise ValueError(f"load_refresh_s must be a finite number >= 0, got {load_refresh_s}")
        if gateways < 1:
            raise ValueError(f"gateways must be >= 1, got {gateways}")
        n = len(pools)
        self.executors: list[SimExecutor] = []
        self.pools: list[SimPool] = []
        for p, cores in enumerate(pools):
            execs = [SimExecutor(len(self.executors) + i, c) for i, c in enumerate(cores)]
            self.executors.extend(execs)
            # pool 0's scheduler draws exactly as ClusterSimulator's router: P = 1 is that run
            self.pools.append(SimPool(p, execs, Router(routing, seed + p), load_refresh_s * p / n))
        self.gateways = [_SimGateway(POOL_ROUTINGS[pool_routing], 1_000_003 * (seed + 1) + g, n)
                         for g in range(gateways)]
        self.routing, self.pool_routing, self.load_refresh_s = routing, pool_routing, load_refresh_s
        _init_run_state(self, cost_model, policy or pools[0][0].policy.name, max_sim_time_s, record_decisions)

    def run(self, items: list[WorkloadItem]) -> ClusterResult:
        execs, pools, gws = self.executors, self.pools, self.gateways
        period, record = self.load_refresh_s, self.record_decisions
        decisions: list[tuple[int, tuple[int, ...]]] = []
        pool_decisions: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        arrivals = 0

        def route(it: WorkloadItem) -> SimExecutor:
            nonlocal arrivals
            gw = gws[arrivals % len(gws)]
            arrivals += 1
            views = gw.views
            for pool, v in zip(pools, views):
                if period == 0:  # exact, instantaneous load
                    v.work, v.num_requests = pool.work, pool.num_requests
                    continue
                if it.arrival_s >= pool.next_publish_s:
                    pool.publish(it.arrival_s, period)
                    for g in gws:
                        g.sent_work[pool.index] = g.sent_requests[pool.index] = 0
                v.work = pool.published_work + gw.sent_work[pool.index]
                v.num_requests = pool.published_requests + gw.sent_requests[pool.index]
            pool = pools[gw.router.pick(views).index]
            gw.sent_work[pool.index] += it.prompt_len + it.output_len
            gw.sent_requests[pool.index] += 1
            if not record:
                return pool.router.pick(pool.executors)
            pool_decisions.append((pool.index, tuple(p.work for p in pools), tuple(v.work for v in views)))
            works = tuple(e.work for e in execs)
            ex = pool.router.pick(pool.executors)
            decisions.append((ex.index, works))
            return ex

        items = sorted(items, key=lambda it: it.arrival_s)
        _set_steady_window(self.metrics, items, self.steady_fraction)
        self.now, wall, stalled = run_events(execs, items, self.cost, self.metrics, route, self.max_sim_time_s)
        return ClusterResult(policy=self.policy, routing=self.routing, metrics=self.metrics, executors=execs,
                             sim_time_s=self.now, wall_time_s=wall, stalled=stalled, decisions=decisions,
                             pools=pools, pool_routing=self.pool_routing, load_refresh_s=period,
                             gateways=len(gws), pool_decisions=pool_decisions)


def simulate_pools(policy: str, items: list[WorkloadItem], pools: int = 2, executors_per_pool: int = 2,
                   pool_routing: str = "jsw", routing: str = "least-work", load_refresh_s: float = 0.1,
                   gateways: int = 1, cost_model: CostModel = PAPER_MODEL, num_blocks: int = 14733,
                   overrides: list[str] | tuple[str, ...] = (), seed: int = 0,
                   max_sim_time_s: float | None = None, record_decisions: bool = True) -> ClusterResult:
    """Run ``items`` through ``pools`` x ``executors_per_pool`` fresh cores running ``policy``."""
    cores = [[build_core(policy, num_blocks, overrides) for _ in range(executors_per_pool)] for _ in range(pools)]
    return PoolClusterSimulator(cores, routing, pool_routing, load_refresh_s, gateways, cost_model, policy, seed,
                                max_sim_time_s, record_decisions).run(items)


def run_cluster_point(policy: str, qps: float, spec: Any, executors: int, routing: str,
                      criterion: Any = None, pools: int = 1, pool_routing: str = "jsw",
                      load_refresh_s: float = 0.1, gateways: int = 1) -> dict[str, Any]:
    """Like ``simulator.capacity.run_point`` for a cluster: ``qps`` is the TOTAL nominal arrival rate.

    ``executors`` is the total; with ``pools`` > 1 they are split evenly into pools behind
    ``gateways`` gateways routing by ``pool_routing``. ``criterion``: anything with
    ``passes(summary)`` and ``margin(summary)`` (default :class:`SloCriterion`).
    """
    items = spec.workload(qps)
    if pools > 1:
        if executors % pools:
            raise ValueError(f"{executors} executors do not split evenly into {pools} pools")
        res = simulate_pools(policy, items, pools, executors // pools, pool_routing, routing, load_refresh_s,
                             gateways, spec.cost_model, spec.num_blocks, spec.overrides, seed=spec.seed,
                             max_sim_time_s=spec.max_sim_time)
    else:
        res = simulate_cluster(policy, items, executors, routing, spec.cost_model, spec.num_blocks,
                               spec.overrides, seed=spec.seed, max_sim_time_s=spec.max_sim_time)
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

"""``slai-serve capacity``: bisection on QPS for the highest load that meets the objectives.

Reports the stable capacity and the paper's beside it (simulator/capacity.py);
``--criterion`` picks which one is ``capacity_qps``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

from scheduler_svc.core.policies.registry import POLICIES
from simulator.cli_args import RunSpec, add_workload_arguments, clean_json, stability_bound
from simulator.metrics import SloCriterion, StableCriterion

CRITERIA = ("stable", "paper")


def add_criterion_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("capacity criterion (simulator/metrics.py)")
    g.add_argument("--criterion", choices=CRITERIA, default="stable",
                   help="which capacity is reported as capacity_qps (both are computed): 'stable' = the paper's "
                        "objectives + steady-state window + TTFT tail + keeping up; 'paper' = the paper's only")
    g.add_argument("--ttft-p50-max", type=float, default=0.5, help="median TTFT must be below this (s)")
    g.add_argument("--tbt-p99-max-paying", type=float, default=0.1, help="paying P99 TBT limit (s)")
    g.add_argument("--tbt-p99-max-free", type=float, default=0.5, help="free P99 TBT limit (s)")
    g.add_argument("--ttft-p99-max", type=float, default=10.0,
                   help="stable: P99 TTFT limit over all users (s); per tier, --paying-ttft / --free-ttft")
    g.add_argument("--drain-max", type=float, default=120.0,
                   help="stable: the last request must finish within this many seconds of the last arrival ...")
    g.add_argument("--min-throughput-ratio", type=float, default=0.97,
                   help="stable: ... or finished requests per second must reach this share of the offered rate")


def criterion_from_args(a: argparse.Namespace, spec: RunSpec | None = None) -> StableCriterion:
    """The stable criterion (its ``paper`` is the paper's); per-tier TTFT objectives from ``spec``."""
    for name in ("ttft_p50_max", "tbt_p99_max_paying", "tbt_p99_max_free", "ttft_p99_max", "drain_max",
                 "min_throughput_ratio"):
        if not getattr(a, name, 1.0) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0")
    paper = SloCriterion(a.ttft_p50_max, a.tbt_p99_max_paying, a.tbt_p99_max_free)
    return StableCriterion(paper, ttft_p99_max_s=a.ttft_p99_max,
                           ttft_p99_max_by_tier=spec.ttft_objectives() if spec is not None else (),
                           drain_max_s=a.drain_max, min_throughput_ratio=a.min_throughput_ratio)


def selected(stable: StableCriterion, name: str) -> SloCriterion | StableCriterion:
    return stable if name == "stable" else stable.paper


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, choices=list(POLICIES))
    add_workload_arguments(p)
    add_criterion_arguments(p)
    p.add_argument("--lo", type=float, default=0.25, help="initial lower QPS bracket")
    p.add_argument("--hi", type=float, default=4.0, help="initial upper QPS bracket (doubled while it passes)")
    p.add_argument("--tol", type=float, default=0.02, help="stop when the bracket is narrower (QPS)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _trial(policy: str, spec: RunSpec, crit: StableCriterion, qps: float) -> dict:
    from simulator.capacity import run_point

    return run_point(policy, qps, spec, criterion=crit)


def capacity_record(policy: str, both: dict[str, dict], bound: dict, chosen: str) -> dict:
    """One policy's result: the chosen criterion's fields at top level, both criteria under ``by_criterion``."""
    lam = bound["lambda_max_nominal_qps"]
    for r in both.values():
        r["fraction_of_stability_bound"] = r["capacity_qps"] / lam
        r["exceeds_stability_bound"] = r["capacity_qps"] > lam
    main = both[chosen]
    return {"policy": policy, **main, "criterion": chosen, "stable_capacity_qps": both["stable"]["capacity_qps"],
            "paper_capacity_qps": both["paper"]["capacity_qps"], "by_criterion": both}


def run(args: argparse.Namespace) -> int:
    from simulator.capacity import find_capacities

    spec = RunSpec.from_args(args)
    crit = criterion_from_args(args, spec)
    both = find_capacities(partial(_trial, args.policy, spec, crit), crit, args.lo, args.hi, args.tol)
    bound = stability_bound(spec, args.policy)
    out = {**capacity_record(args.policy, both, bound, args.criterion), "criterion_settings": crit.describe(),
           "stability_bound": bound, **spec.describe()}
    out = clean_json(out)
    if args.json:
        json.dump(out, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for name in CRITERIA:
            r = out["by_criterion"][name]
            for t in r["trials"]:
                print(f"[{name}] qps {t['qps']:.4f}  {'pass' if t['passes'] else 'FAIL'}  margin {t['margin']}"
                      f"{'  (reused)' if t['reused'] else ''}")
        for name in CRITERIA:
            r = out["by_criterion"][name]
            print(f"{name} capacity {r['capacity_qps']:.4f} QPS (interpolated {r['capacity_qps_interpolated']:.4f}), "
                  f"{100 * r['fraction_of_stability_bound']:.1f}% of the stability bound "
                  f"{bound['lambda_max_nominal_qps']:.3f}; binding {r['binding_constraint']}")
    return 0

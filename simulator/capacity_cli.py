"""``slai-serve capacity``: bisection on QPS for the highest load that meets the SLOs."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

from scheduler_svc.core.policies.registry import POLICIES
from simulator.cli_args import RunSpec, add_workload_arguments, clean_json, stability_bound
from simulator.metrics import SloCriterion


def add_criterion_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("capacity criterion (median TTFT, per-tier P99 TBT)")
    g.add_argument("--ttft-p50-max", type=float, default=0.5, help="median TTFT must be below this (s)")
    g.add_argument("--tbt-p99-max-paying", type=float, default=0.1, help="paying P99 TBT limit (s)")
    g.add_argument("--tbt-p99-max-free", type=float, default=0.5, help="free P99 TBT limit (s)")


def criterion_from_args(a: argparse.Namespace) -> SloCriterion:
    return SloCriterion(a.ttft_p50_max, a.tbt_p99_max_paying, a.tbt_p99_max_free)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, choices=list(POLICIES))
    add_workload_arguments(p)
    add_criterion_arguments(p)
    p.add_argument("--lo", type=float, default=0.25, help="initial lower QPS bracket")
    p.add_argument("--hi", type=float, default=4.0, help="initial upper QPS bracket (doubled while it passes)")
    p.add_argument("--tol", type=float, default=0.02, help="stop when the bracket is narrower (QPS)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _trial(policy: str, spec: RunSpec, crit: SloCriterion, qps: float) -> dict:
    from simulator.capacity import run_point

    return run_point(policy, qps, spec, criterion=crit)


def run(args: argparse.Namespace) -> int:
    from simulator.capacity import find_capacity

    spec = RunSpec.from_args(args)
    crit = criterion_from_args(args)
    res = find_capacity(partial(_trial, args.policy, spec, crit), crit, args.lo, args.hi, args.tol)
    bound = stability_bound(spec, args.policy)
    out = {"policy": args.policy, **res, "criterion": {"ttft_p50_max_s": crit.ttft_p50_max_s,
                                                       "tbt_p99_max_paying_s": crit.tbt_p99_max_paying_s,
                                                       "tbt_p99_max_free_s": crit.tbt_p99_max_free_s},
           "stability_bound": bound,
           "fraction_of_stability_bound": res["capacity_qps"] / bound["lambda_max_nominal_qps"],
           **spec.describe()}
    out = clean_json(out)
    if args.json:
        json.dump(out, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for t in out["trials"]:
            print(f"qps {t['qps']:.4f}  {'pass' if t['passes'] else 'FAIL'}  margin {t['margin']}")
        print(f"capacity {out['capacity_qps']:.4f} QPS (interpolated {out['capacity_qps_interpolated']:.4f}), "
              f"{100 * out['fraction_of_stability_bound']:.1f}% of the stability bound")
    return 0

"""``slai-serve sim``: one policy at one load, through the real scheduling core."""

from __future__ import annotations

import argparse
import json
import sys

from scheduler_svc.core.policies.registry import POLICIES
from simulator.cli_args import (
    RunSpec,
    add_cluster_arguments,
    add_workload_arguments,
    clean_json,
    pool_shape,
    stability_bound,
)
from simulator.metrics import SloCriterion


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, choices=list(POLICIES))
    p.add_argument("--qps", type=float, required=True, help="nominal Poisson arrival rate (total over executors)")
    add_workload_arguments(p)
    add_cluster_arguments(p)
    p.add_argument("--steps-out", default=None, metavar="FILE",
                   help="write per-step statistics (time, prefill tokens, decodes, KV use, queues) as CSV")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a short text report)")


def run(args: argparse.Namespace) -> int:
    from simulator.capacity import run_point

    spec = RunSpec.from_args(args)
    if args.executors > 1 or args.routing is not None or args.pools > 1 or args.executors_per_pool is not None:
        return _run_cluster(args, spec)
    s = run_point(args.policy, args.qps, spec, record_steps=bool(args.steps_out), criterion=SloCriterion())
    steps = s.pop("_steps", None)
    if steps is not None:
        cols = steps.cols
        with open(args.steps_out, "w") as fh:
            fh.write(",".join(cols) + "\n")
            for row in zip(*cols.values()):
                fh.write(",".join(f"{v:.6g}" for v in row) + "\n")
    s.update(spec.describe())
    s["num_requests"] = spec.num_requests
    s["stability_bound"] = stability_bound(spec, args.policy)
    return _emit(clean_json(s), args.json)


def _run_cluster(args: argparse.Namespace, spec: RunSpec) -> int:
    """``--executors K --routing NAME [--pools P --pool-routing RULE]``: K cores behind one router,
    or P pools of them behind gateways (simulator/cluster.py)."""
    from simulator.cluster import run_cluster_point

    if args.steps_out:
        raise SystemExit("slai-serve sim: --steps-out needs a single executor")
    pools, per = pool_shape(args)
    s = run_cluster_point(args.policy, args.qps, spec, pools * per, args.routing or "least-work",
                          criterion=SloCriterion(), pools=pools, pool_routing=args.pool_routing,
                          load_refresh_s=args.load_refresh_s, gateways=args.gateways)
    s.update(spec.describe())
    s["num_requests"] = spec.num_requests
    s["stability_bound_per_executor"] = stability_bound(spec, args.policy)
    extra = ("executors", "routing", "qps_per_executor", "requests_by_executor", "work_spread_mean_tokens")
    if pools > 1:
        extra += ("pools", "pool_routing", "load_refresh_s", "requests_by_pool", "pool_work_spread_mean_tokens",
                  "pool_load_error_mean_tokens")
    return _emit(clean_json(s), args.json, extra)


def _emit(out: dict, as_json: bool, extra: tuple[str, ...] = ()) -> int:
    """One JSON object on stdout, or the human-readable summary."""
    if as_json:
        json.dump(out, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        _print(out, extra)
    return 0


def _print(out: dict, extra: tuple[str, ...] = ()) -> None:
    keys = ("policy", "qps", "effective_qps", "num_requests", "num_finished", "ttft_p50_s", "ttft_p99_s",
            "ttft_p50_s_by_tier", "tbt_p99_s_by_tier", "slo_attainment_by_tier", "throughput_tokens_per_s",
            "num_preemptions", "meets_slo", "sim_time_s", "wall_time_s", "sim_speed") + extra
    for k in keys:
        print(f"{k:28s} {out.get(k)}")
    if "prefix_cache_hit_rate" in out:  # only runs whose requests carry token ids look anything up
        for k in ("prefix_cache_hit_rate", "prefix_cache_hits", "prefix_cache_queries"):
            print(f"{k:28s} {out[k]}")

"""``slai-serve compare``: every policy over a QPS grid, capacities, tables and plots.

Steps (each a pool of worker processes, with a tqdm bar):
1. the grid: every policy at every QPS;
2. capacity per policy under both criteria (stable and the paper's,
   simulator/capacity.py): bisection to ``--tol`` QPS, starting from the grid's
   bracket (last pass below the first fail), reported also as a fraction of the
   stability bound lambda * (mean P + mean D) < b / t_b; ``--criterion`` picks
   the one the tables lead with and the reference run uses;
3. every policy at the reference policy's capacity (SLAI vs Sarathi-FCFS median TTFT);
4. a queue-length-over-time run of ``--queue-policies`` at ``--queue-qps``.

Writes ``results.json``, ``results.md`` and PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from scheduler_svc.core.policies.registry import NEW_BASELINES, PAPER_POLICIES, POLICIES
from simulator.capacity_cli import add_criterion_arguments, capacity_record, criterion_from_args
from simulator.cli_args import RunSpec, add_workload_arguments, clean_json, stability_bound
from simulator.metrics import StableCriterion

DEFAULT_POLICIES = list(PAPER_POLICIES) + ["rad", "edf"] + list(NEW_BASELINES) + ["slai-adaptive"]
DEFAULT_GRID = "0.2,0.4,0.6,0.8,1.0,1.2,1.4,1.6,1.8,2.0"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="comma-separated policy names")
    p.add_argument("--qps-grid", default=DEFAULT_GRID, help="comma-separated QPS values")
    add_workload_arguments(p)
    add_criterion_arguments(p)
    p.add_argument("--tol", type=float, default=0.02, help="capacity bisection tolerance (QPS)")
    p.add_argument("--reference-policy", default="sarathi-fcfs",
                   help="run every policy at this policy's capacity (median-TTFT comparison)")
    p.add_argument("--queue-policies", default="vllm,rad", help="policies for the queue-length plot")
    p.add_argument("--queue-qps", type=float, default=None,
                   help="QPS of the queue-length plot (default: just above the grid's last vllm pass)")
    p.add_argument("--queue-requests", type=int, default=None, help="requests of the queue run (default: --num-requests)")
    p.add_argument("--no-capacity", action="store_true", help="skip the capacity search")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--out", required=True, help="output directory")


# ---------------------------------------------------------------- workers (module level: picklable)
def _grid_task(spec: RunSpec, crit: StableCriterion, task: tuple[str, float]) -> dict[str, Any]:
    from simulator.capacity import run_point

    return run_point(task[0], task[1], spec, criterion=crit)


def _capacity_task(spec: RunSpec, crit: StableCriterion, tol: float, task: tuple[str, dict]) -> dict[str, Any]:
    """Both capacities of one policy: ``{"stable": ..., "paper": ...}`` plus policy and wall time."""
    from simulator.capacity import find_capacities, run_point

    policy, known = task
    t0 = time.perf_counter()
    res: dict[str, Any] = find_capacities(lambda q: run_point(policy, q, spec, criterion=crit), crit, tol=tol,
                                          known=known)
    res["policy"] = policy
    res["wall_time_s"] = time.perf_counter() - t0
    return res


def _queue_task(spec: RunSpec, crit: StableCriterion, task: tuple[str, float]) -> dict[str, Any]:
    from simulator.capacity import run_point

    s = run_point(task[0], task[1], spec, record_steps=True, criterion=crit)
    steps = s.pop("_steps")
    every = max(1, len(steps) // 4000)
    s["steps"] = {k: [round(v, 4) for v in vals] for k, vals in steps.as_lists(every).items()}
    return s


def _pool_map(fn, tasks: list, workers: int, desc: str) -> list:
    from tqdm import tqdm

    out = []
    if workers <= 1 or len(tasks) <= 1:
        for t in tqdm(tasks, desc=desc, file=sys.stderr):
            out.append(fn(t))
        return out
    ctx = mp.get_context("fork")
    with ctx.Pool(min(workers, len(tasks))) as pool:
        for r in tqdm(pool.imap_unordered(fn, tasks), total=len(tasks), desc=desc, file=sys.stderr):
            out.append(r)
    return out


# ---------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    spec = RunSpec.from_args(args)
    crit = criterion_from_args(args, spec)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}")
    grid = [float(q) for q in args.qps_grid.split(",") if q.strip()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. grid (heaviest QPS first so the pool's tail is short)
    tasks = sorted(((p, q) for p in policies for q in grid), key=lambda t: -t[1])
    rows = _pool_map(partial(_grid_task, spec, crit), tasks, args.workers, "grid")
    rows.sort(key=lambda r: (policies.index(r["policy"]), r["qps"]))
    bound = stability_bound(spec, policies[0])
    results: dict[str, Any] = {"config": {**spec.describe(), "policies": policies, "qps_grid": grid,
                                          "criterion": crit.describe(), "capacity_criterion": args.criterion,
                                          "command": "slai-serve compare " + " ".join(sys.argv[2:])},
                               "stability_bound": bound, "tol": args.tol, "grid": rows}
    _save(out_dir, results)

    # 2. capacity
    caps: dict[str, dict] = {}
    if not args.no_capacity:
        known = {p: {r["qps"]: r for r in rows if r["policy"] == p} for p in policies}
        ctasks = [(p, known[p]) for p in policies]
        for c in _pool_map(partial(_capacity_task, spec, crit, args.tol), ctasks, args.workers, "capacity"):
            rec = capacity_record(c["policy"], {k: c[k] for k in ("stable", "paper")}, bound, args.criterion)
            rec["wall_time_s"] = c["wall_time_s"]
            caps[c["policy"]] = rec
        results["capacity"] = {p: caps[p] for p in policies}
        _save(out_dir, results)

        # 3. everyone at the reference policy's capacity
        ref = args.reference_policy
        if ref in caps and caps[ref]["capacity_qps"] > 0:
            q_ref = round(caps[ref]["capacity_qps"], 6)
            at_ref = _pool_map(partial(_grid_task, spec, crit), [(p, q_ref) for p in policies], args.workers,
                               f"at {ref} capacity")
            at_ref.sort(key=lambda r: policies.index(r["policy"]))
            results["at_reference_capacity"] = {"reference_policy": ref, "qps": q_ref, "rows": at_ref}
            _save(out_dir, results)

    # 4. queue length over time
    qpols = [p for p in args.queue_policies.split(",") if p.strip() in POLICIES]
    if qpols:
        q_qps = args.queue_qps
        if q_qps is None:
            q_qps = _default_queue_qps(rows, caps, bound)
        qspec = spec if args.queue_requests is None else _with(spec, num_requests=args.queue_requests)
        qruns = _pool_map(partial(_queue_task, qspec, crit), [(p, q_qps) for p in qpols], args.workers, "queue")
        results["queue_runs"] = {"qps": q_qps, "runs": {r["policy"]: r for r in qruns}}
    results["wall_time_s"] = time.perf_counter() - t_start
    _save(out_dir, results)
    from simulator.report import write_report

    write_report(results, out_dir)
    print(f"wrote {out_dir}/results.md, results.json and plots in {results['wall_time_s']:.0f} s", file=sys.stderr)
    return 0


def _with(spec: RunSpec, **changes: Any) -> RunSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def _default_queue_qps(rows: list[dict], caps: dict[str, dict], bound: dict) -> float:
    """A load inside the stability bound but above vllm's throughput limit (92% of the bound)."""
    return round(0.92 * bound["lambda_max_nominal_qps"], 2)


def _save(out_dir: Path, results: dict[str, Any]) -> None:
    slim = dict(results)
    if "queue_runs" in slim:  # keep results.json small: steps go to their own file
        qr = slim["queue_runs"]
        (out_dir / "queue_runs.json").write_text(json.dumps(clean_json(qr), separators=(",", ":")))
        slim["queue_runs"] = {"qps": qr["qps"], "runs": {p: {k: v for k, v in r.items() if k != "steps"}
                                                         for p, r in qr["runs"].items()}}
    (out_dir / "results.json").write_text(json.dumps(clean_json(slim), indent=1, sort_keys=True))

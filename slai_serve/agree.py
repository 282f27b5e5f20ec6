"""``slai-serve agree``: the live stack and the simulator on the same workload, side by side.

    slai-serve agree --policy slai --qps 1.5,2.2,2.8 --num-requests 200 --trace paper

For each load it starts a fresh local stack (``LocalStack``: gateway, scheduler,
one fake executor that *sleeps* each step for the cost model's time on a pool of
``--kv-blocks`` blocks), replays the workload through the gateway as
``bench-serve`` does (tiers by the demo keys), and simulates the very same
requests (same arrivals, same lengths after the model-length clip, same tiers)
with ``slai-serve sim``'s core and cost model. It prints both with their ratios
and the agreement goals: median TTFT within 10 %, P99 TBT and median
end-to-end within 5 %, step counts within 5 % (docs/results.md, *Live agreement*).

What the two cannot share, and why they still should agree: the live run pays
real RPC, gateway and detokenizing time per token, and the sleep's overshoot,
which planning ahead hides from the executor (docs/scheduler.md); the simulator
charges exactly the model. So each load is also simulated with the live stack's
measured per-step overhead added to the cost model (columns ``sim+ovh``): when the
live run agrees with that but not with the plain simulation, the gap is the
machine's overhead, not a difference in what the two model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

# (metric, goal: |live / sim - 1| at most this; None = shown, no goal)
GOALS: tuple[tuple[str, float | None], ...] = (
    ("ttft_p50_s", 0.10), ("ttft_mean_s", None), ("scheduler_ttft_mean_s", None), ("ttft_p99_s", None), ("tbt_p99_s", 0.05), ("e2e_p50_s", 0.05), ("num_steps", 0.05),
    ("num_preemptions", None), ("throughput_tokens_per_s", None), ("mean_step_s", None),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from scheduler_svc.core.policies.registry import POLICIES

    p.add_argument("--policy", required=True, choices=list(POLICIES))
    p.add_argument("--qps", required=True, help="comma-separated loads, e.g. 1.5,2.2,2.8")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--trace", default="paper", metavar="PATH|paper|synthetic")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--paying-prob", type=float, default=0.05)
    p.add_argument("--cost-model", default="paper", help="'paper' or a cost-model JSON file (slept live, charged "
                                                         "in the simulator)")
    p.add_argument("--kv-blocks", type=int, default=14733, help="KV pool of the executor and the simulated core")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="scheduler setting for both sides (repeatable)")
    p.add_argument("--scheduler-arg", action="append", default=[], help="extra scheduler flag for the live side")
    p.add_argument("--model-dir", default="", help="tokenizer folder (default: the converted SmolLM2)")
    p.add_argument("--log-dir", default="", help="the services' logs (default: a new temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object per load")


def ratio(live: float | None, sim: float | None) -> float | None:
    if live is None or sim is None or sim == 0:
        return None
    return live / sim


def compare(live: dict[str, Any], sim: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: live, sim, live/sim, goal and whether it is met."""
    rows = []
    for key, goal in GOALS:
        r = ratio(live.get(key), sim.get(key))
        rows.append({"metric": key, "live": live.get(key), "sim": sim.get(key), "ratio": r, "goal": goal,
                     "ok": None if goal is None or r is None else abs(r - 1) <= goal})
    return rows


def simulate_items(policy: str, items: list, args: argparse.Namespace, overhead_ms: float | None = None
                   ) -> dict[str, Any]:
    """The simulator on ``items``; ``overhead_ms``: add this to every step (the live stack's measured one)."""
    from contract.cost_models import resolve_cost_model
    from simulator.sim import simulate

    res = simulate(policy, items, resolve_cost_model(args.cost_model, overhead_ms), num_blocks=args.kv_blocks,
                   overrides=args.overrides, record_steps=False)
    s = res.summary()
    s["scheduler_ttft_mean_s"] = s["ttft_mean_s"]  # the simulator's clock is the scheduler's
    return s


def run_live(policy: str, items: list, builder, key_file: str, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh stack; the workload replayed through its gateway; the scheduler's step count."""
    from slai_serve.bench_serve import replay, scheduler_stats
    from slai_serve.launch import LocalStack

    sched_args = [*args.scheduler_arg]
    for o in args.overrides:
        sched_args += ["--set", o]
    stack = LocalStack(fake=True, policy=policy, gateway_grpc_port=0, http_port=0, scheduler_port=0,
                       executor_port=0, metrics_port=0, api_keys=key_file, log_dir=args.log_dir,
                       model_dir=args.model_dir,
                       executor_args=["--fake-cost", args.cost_model, "--kv-blocks", str(args.kv_blocks),
                                      "--log-level", "WARNING"],
                       scheduler_args=sched_args + ["--log-level", "WARNING"])
    stack.start()
    try:
        from gateway.auth import load_key_file

        store = load_key_file(key_file)
        keys = {t: store.key_for_tier(t) for t in ("paying", "free")}
        before = scheduler_stats(stack.scheduler_address, stack.service_token) or {}
        collector, extra = asyncio.run(replay(stack.gateway_address, items, builder, keys))
        after = scheduler_stats(stack.scheduler_address, stack.service_token) or {}
        sched_ttft = scheduler_ttft_mean(f"http://{stack.host}:{stack.metrics_port}/metrics")
    finally:
        stack.stop()
    s = collector.summary()
    # the scheduler's own TTFT (Submit to token, on its clock): what the client's adds is gateway and delivery
    s["scheduler_ttft_mean_s"] = sched_ttft
    extra.pop("_records", None)
    s.update(extra)
    if before and after:
        s["num_steps"] = after["num_steps"] - before["num_steps"]
        s["num_preemptions"] = after["num_preemptions"] - before["num_preemptions"]
        # the scheduler's mean step (cumulative estimator: every step, start to result) and what of it is not
        # the executor's own time; both stacks are fresh, so "before" holds no steps
        s["mean_step_s"] = after["mean_batch_s"]
        s["live_rpc_overhead_s"] = after["mean_rpc_overhead_s"]
        s["live_executor_wait_s"] = after["mean_executor_wait_s"]
    return s


def scheduler_ttft_mean(url: str) -> float | None:
    """Mean TTFT from the scheduler's Prometheus histogram (all tiers), or None when unreadable."""
    import urllib.request

    from telemetry.names import M_TIME_TO_FIRST_TOKEN

    try:
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        for suffix in total:
            if line.startswith(M_TIME_TO_FIRST_TOKEN + suffix):
                total[suffix] += float(line.rsplit(" ", 1)[1])
    return total["_sum"] / total["_count"] if total["_count"] else None


def run(args: argparse.Namespace) -> int:
    from contract.model_files import default_model_dir
    from simulator.workloads import clip_lengths, make_workload
    from slai_serve.bench_serve import PromptBuilder, _clean
    from slai_serve.demo_keys import ensure_demo_keys

    loads = [float(q) for q in str(args.qps).split(",") if q.strip()]
    if not loads or any(q <= 0 for q in loads):
        raise ValueError(f"--qps: give one or more positive loads, got {args.qps!r}")
    if args.num_requests < 1:
        raise ValueError(f"--num-requests: must be >= 1, got {args.num_requests}")
    model_dir = args.model_dir or str(default_model_dir())
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise ValueError(f"--model-dir: no tokenizer.json in {model_dir}")
    builder = PromptBuilder.from_model_dir(model_dir)
    key_file = str(ensure_demo_keys())
    out = []
    for qps in loads:
        items = make_workload(args.num_requests, qps, seed=args.seed, trace=args.trace,
                              paying_prob=args.paying_prob, max_total=builder.max_model_len)
        # the gateway's model length clips a prompt as bench-serve does: simulate the clipped request
        items = [replace(it, prompt_len=p, output_len=o) for it in items
                 for p, o in [clip_lengths(it.prompt_len, it.output_len, 0, 0, builder.max_model_len)]]
        t0 = time.monotonic()
        sim = simulate_items(args.policy, items, args)
        live = run_live(args.policy, items, builder, key_file, args)
        point = {"policy": args.policy, "qps": qps, "num_requests": args.num_requests, "trace": args.trace,
                 "seed": args.seed, "paying_prob": args.paying_prob, "cost_model": args.cost_model,
                 "rows": compare(live, sim), "live_errors": live.get("num_errors", 0),
                 "live_rpc_overhead_s": live.get("live_rpc_overhead_s"),
                 "live_executor_wait_s": live.get("live_executor_wait_s"),
                 "live_wall_s": time.monotonic() - t0}
        point["agrees"] = all(r["ok"] is not False for r in point["rows"]) and not point["live_errors"]
        overhead_s = live.get("live_rpc_overhead_s")
        if overhead_s:  # diagnosis: is the gap the live stack's per-step overhead, or a different model?
            sim_oh = simulate_items(args.policy, items, args, overhead_ms=1e3 * overhead_s)
            for r in point["rows"]:
                r["sim_with_overhead"] = sim_oh.get(r["metric"])
                r["ratio_with_overhead"] = ratio(r["live"], sim_oh.get(r["metric"]))
        point = _clean(point)
        out.append(point)
        if args.json:
            json.dump(point, sys.stdout, sort_keys=True)
            sys.stdout.write("\n")
        else:
            print_point(point)
        sys.stdout.flush()
    return 0 if all(p["agrees"] for p in out) else 1


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_point(p: dict[str, Any]) -> None:
    print(f"\n{p['policy']} at {p['qps']:g} QPS, {p['num_requests']} requests ({p['trace']}, seed {p['seed']}, "
          f"{p['paying_prob']:g} paying, cost model {p['cost_model']}): "
          f"{'AGREES' if p['agrees'] else 'DISAGREES'}"
          + (f", {p['live_errors']} live errors" if p["live_errors"] else ""))
    if p.get("live_rpc_overhead_s") is not None:
        print(f"  live per step: {1e3 * p['live_rpc_overhead_s']:.2f} ms outside the executor, executor waited "
              f"{1e3 * (p.get('live_executor_wait_s') or 0):.2f} ms for each plan")
    print(f"  {'metric':26s} {'live':>10s} {'sim':>10s} {'live/sim':>9s}  {'goal':12s} {'sim+ovh':>10s} "
          f"{'live/sim+ovh':>12s}")
    for r in p["rows"]:
        goal = "" if r["goal"] is None else f"±{100 * r['goal']:.0f}% {'ok' if r['ok'] else 'MISS'}"
        print(f"  {r['metric']:26s} {_fmt(r['live']):>10s} {_fmt(r['sim']):>10s} {_fmt(r['ratio']):>9s}  {goal:12s} "
              f"{_fmt(r.get('sim_with_overhead')):>10s} {_fmt(r.get('ratio_with_overhead')):>12s}")

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

What the two share by construction: the core, the cost model, the requests (each
prompt distinct in its first KV block, so the live prefix cache finds nothing the
simulated requests could not), and the instant each step is decided: the simulated
side plans ahead as the live driver does (``simulator/plan_ahead.py``, the live
scheduler's ``pipeline_lead_s``; ``--sim-at-step-end`` for the plain simulator, whose
numbers are also shown as ``sim@end``).

What they cannot share, and why they still should agree: the live run pays real
RPC, gateway and detokenizing time, the executor's bookkeeping and the sleep's
overshoot; the simulator charges exactly the model. So each load is also simulated
with the live stack's measured excess per step (its mean step minus the simulated
one, a single number per run) added to every step (``sim+ovh``): when the live run
agrees with that but not with the plain simulation, the gap is the machine's time
per step, not a difference in what the two model. A diagnosis, not the verdict. And the load client
times tokens on its own clock, after the gateway and delivery: the ``scheduler_*``
rows are the same requests on the scheduler's clock (the one the simulator models),
and the verdict is given on both.
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

# (metric, goal: |live / sim - 1| at most this; None = shown, no goal). The plain names are timed on the load
# client's clock (what a user sees: gateway, delivery and the client's own lag included); ``scheduler_*`` are
# the same requests on the scheduler's clock, the clock the simulator models (TTFT and end-to-end from each
# request's RequestTimings; the TBT quantile from the scheduler's Stats, 1%-wide log buckets, the simulator's
# gaps put through the same buckets; ``scheduler_tbt_p99_hist_s``: the Prometheus histogram's coarse
# dashboard buckets, both sides, shown only).
GOALS: tuple[tuple[str, float | None], ...] = (
    ("ttft_p50_s", 0.10), ("scheduler_ttft_p50_s", 0.10), ("ttft_mean_s", None), ("scheduler_ttft_mean_s", None),
    ("ttft_p99_s", None), ("tbt_p99_s", 0.05), ("scheduler_tbt_p99_s", 0.05), ("scheduler_tbt_p99_hist_s", None),
    ("e2e_p50_s", 0.05), ("scheduler_e2e_p50_s", 0.05), ("num_steps", 0.05), ("num_preemptions", None),
    ("throughput_tokens_per_s", None), ("mean_step_s", None), ("planned_ahead_fraction", None),
    ("mean_plan_ahead_lead_s", None),
)
CLIENT_CLOCK = ("ttft_p50_s", "tbt_p99_s", "e2e_p50_s", "num_steps")
SCHEDULER_CLOCK = ("scheduler_ttft_p50_s", "scheduler_tbt_p99_s", "scheduler_e2e_p50_s", "num_steps")


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
    p.add_argument("--sim-at-step-end", action="store_true",
                   help="simulate deciding each step at the previous one's end (the default simulator) instead of "
                        "planning ahead as the live scheduler does")
    p.add_argument("--json", action="store_true", help="print one JSON object per load")


def live_plan_ahead_lead_s(scheduler_args: list[str]) -> float | None:
    """The live scheduler's planning-ahead lead under ``scheduler_args`` (its defaults otherwise), or
    None when it does not plan ahead (``--no-pipeline``): what the simulated side must model."""
    from scheduler_svc.config import ServiceConfig

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false")
    p.add_argument("--pipeline-lead-ms", type=float, default=1e3 * ServiceConfig().pipeline_lead_s)
    known, _ = p.parse_known_args(scheduler_args)
    if known.pipeline_lead_ms < 0:
        raise ValueError(f"--scheduler-arg=--pipeline-lead-ms must be >= 0, got {known.pipeline_lead_ms:g}")
    return known.pipeline_lead_ms / 1e3 if known.pipeline else None


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


def agrees_on(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> bool:
    """Every goal among ``metrics`` met (a metric missing on either side is not met)."""
    by = {r["metric"]: r for r in rows}
    return all(by[m]["ok"] is True for m in metrics)


def histogram_quantile(text: str, name: str, q: float) -> float | None:
    """The ``q`` quantile (0..1) of Prometheus histogram ``name`` in ``text``, its series (tiers) pooled,
    interpolated linearly within the bucket as Prometheus' ``histogram_quantile`` does; None when empty."""
    counts: dict[float, float] = {}
    prefix = name + "_bucket{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, value = line[len(prefix):].rsplit("} ", 1)
        le = next(v for k, v in (kv.split("=", 1) for kv in labels.split(",")) if k == "le").strip('"')
        bound = float("inf") if le == "+Inf" else float(le)
        counts[bound] = counts.get(bound, 0.0) + float(value)
    return _quantile_of_buckets(sorted(counts.items()), q)


def samples_quantile(samples, bounds: tuple[float, ...], q: float) -> float | None:
    """What :func:`histogram_quantile` would say of ``samples`` observed into buckets ``bounds``
    (the simulated side of a quantile that the live side only has as a histogram)."""
    import bisect

    cum = [0] * len(bounds)
    n = 0
    for x in samples:
        n += 1
        i = bisect.bisect_left(bounds, x)  # Prometheus buckets are le= (upper bound included)
        if i < len(bounds):
            cum[i] += 1
    for i in range(1, len(cum)):
        cum[i] += cum[i - 1]
    return _quantile_of_buckets([*zip(bounds, cum), (float("inf"), n)], q)


def _quantile_of_buckets(cumulative: list[tuple[float, float]], q: float) -> float | None:
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if bound == float("inf"):
                return lo_bound  # above the last finite bucket: its upper bound, as Prometheus
            if count == lo_count:
                return bound
            return lo_bound + (bound - lo_bound) * (rank - lo_count) / (count - lo_count)
        lo_bound, lo_count = bound, count
    return None


def simulate_items(policy: str, items: list, args: argparse.Namespace, overhead_ms: float | None = None,
                   at_step_end: bool | None = None) -> dict[str, Any]:
    """The simulator on ``items``; ``overhead_ms``: add this to every step (the live stack's measured one).

    It plans each step ahead as the live scheduler does (``simulator/plan_ahead.py``, with the
    live scheduler's lead) unless ``at_step_end`` (default: ``--sim-at-step-end``) or the live
    scheduler runs with ``--no-pipeline``.
    """
    from contract.cost_models import resolve_cost_model
    from simulator.sim import simulate

    if at_step_end is None:
        at_step_end = args.sim_at_step_end
    lead = None if at_step_end else live_plan_ahead_lead_s(args.scheduler_arg)
    res = simulate(policy, items, resolve_cost_model(args.cost_model, overhead_ms), num_blocks=args.kv_blocks,
                   overrides=args.overrides, record_steps=False, plan_ahead_lead_s=lead)
    from telemetry.log_histogram import LogHistogram
    from telemetry.metrics import ITL_BUCKETS

    s = res.summary()
    # the simulator's clock is the scheduler's
    for key in ("ttft_p50_s", "ttft_mean_s", "e2e_p50_s"):
        s["scheduler_" + key] = s[key]
    gaps = res.metrics.tbt_samples()
    s["scheduler_tbt_p99_s"] = LogHistogram().add_all(gaps.tolist()).quantile(0.99)  # as the live scheduler's Stats
    s["scheduler_tbt_p99_hist_s"] = samples_quantile(gaps, ITL_BUCKETS, 0.99)
    s["planned_ahead_fraction"] = planned_ahead_fraction(s)
    return s


def step_excess_s(live: dict[str, Any], sim: dict[str, Any]) -> float | None:
    """How much longer the live stack's mean step was than the simulated one (None when not longer):
    the machine's time per step (decision, hops, the executor's bookkeeping, the sleep's overshoot),
    one number per run, that ``sim+ovh`` adds to every simulated step."""
    a, b = live.get("mean_step_s"), sim.get("mean_step_s")
    return a - b if a is not None and b is not None and a > b else None


def planned_ahead_fraction(s: dict[str, Any]) -> float | None:
    """The share of steps decided while the step before them ran (0 when nothing is planned ahead)."""
    n = s.get("num_steps")
    return (s.get("num_steps_planned_ahead") or 0) / n if n else None


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
        page = fetch_metrics(f"http://{stack.host}:{stack.metrics_port}/metrics")
    finally:
        stack.stop()
    s = collector.summary()
    # the same requests on the scheduler's clock (Submit to token): what the client's clock adds is the gateway
    # (tokenizing), the hops and delivery
    s.update(scheduler_clock_summary(extra.pop("_timings", {}), page))
    extra.pop("_records", None)
    s.update(extra)
    # the stack is fresh: its Stats' TBT quantiles are this run's
    s["scheduler_tbt_p99_s"] = after.get("tbt_p99_s") if after.get("num_tbt_samples") else None
    if before and after:
        s["num_steps"] = after["num_steps"] - before["num_steps"]
        s["num_preemptions"] = after["num_preemptions"] - before["num_preemptions"]
        # the scheduler's mean step (cumulative estimator: every step, start to result) and what of it is not
        # the executor's own time; both stacks are fresh, so "before" holds no steps
        s["mean_step_s"] = after["mean_batch_s"]
        s["live_rpc_overhead_s"] = after["mean_rpc_overhead_s"]
        s["live_executor_wait_s"] = after["mean_executor_wait_s"]
        s["num_steps_planned_ahead"] = after.get("num_steps_planned_ahead", 0) - before.get("num_steps_planned_ahead", 0)
        s["planned_ahead_fraction"] = planned_ahead_fraction(s)
        s["mean_plan_ahead_lead_s"] = after.get("mean_plan_ahead_lead_s")
    return s


def fetch_metrics(url: str) -> str | None:
    """A Prometheus page, or None when unreadable."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            return resp.read().decode()
    except OSError:
        return None


def scheduler_ttft_mean(url: str) -> float | None:
    """Mean TTFT from the scheduler's Prometheus histogram (all tiers), or None when unreadable."""
    text = fetch_metrics(url)
    return None if text is None else _histogram_mean(text)


def _histogram_mean(text: str) -> float | None:
    from telemetry.names import M_TIME_TO_FIRST_TOKEN

    total = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        for suffix in total:
            if line.startswith(M_TIME_TO_FIRST_TOKEN + suffix):
                total[suffix] += float(line.rsplit(" ", 1)[1])
    return total["_sum"] / total["_count"] if total["_count"] else None


def scheduler_clock_summary(timings: dict[str, dict[str, float]], page: str | None) -> dict[str, float | None]:
    """Live metrics on the scheduler's clock: TTFT and end-to-end medians from each finished request's
    RequestTimings (``timings``: req_id -> ttft_s, e2e_s), the TBT P99 from the scheduler's Prometheus
    histogram (``page``, its /metrics; dashboard buckets), the mean TTFT from timings or else the histogram."""
    import numpy as np

    from telemetry.names import M_INTER_TOKEN_LATENCY

    ttft = np.array([t["ttft_s"] for t in timings.values()])
    e2e = np.array([t["e2e_s"] for t in timings.values()])
    out: dict[str, float | None] = {
        "scheduler_ttft_p50_s": float(np.percentile(ttft, 50)) if ttft.size else None,
        "scheduler_ttft_mean_s": float(ttft.mean()) if ttft.size else None,
        "scheduler_e2e_p50_s": float(np.percentile(e2e, 50)) if e2e.size else None,
        "scheduler_tbt_p99_hist_s": None,
    }
    if page is not None:
        out["scheduler_tbt_p99_hist_s"] = histogram_quantile(page, M_INTER_TOKEN_LATENCY, 0.99)
        if out["scheduler_ttft_mean_s"] is None:
            out["scheduler_ttft_mean_s"] = _histogram_mean(page)
    return out


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
        lead = None if args.sim_at_step_end else live_plan_ahead_lead_s(args.scheduler_arg)
        sim = simulate_items(args.policy, items, args)
        live = run_live(args.policy, items, builder, key_file, args)
        point = {"policy": args.policy, "qps": qps, "num_requests": args.num_requests, "trace": args.trace,
                 "seed": args.seed, "paying_prob": args.paying_prob, "cost_model": args.cost_model,
                 "sim_plan_ahead_lead_s": lead,
                 "rows": compare(live, sim), "live_errors": live.get("num_errors", 0),
                 "live_rpc_overhead_s": live.get("live_rpc_overhead_s"),
                 "live_executor_wait_s": live.get("live_executor_wait_s"),
                 "live_wall_s": time.monotonic() - t0}
        # the goals on the client's clock (what the issue measured, delivery included), and on the scheduler's
        point["agrees"] = agrees_on(point["rows"], CLIENT_CLOCK) and not point["live_errors"]
        point["agrees_scheduler_clock"] = agrees_on(point["rows"], SCHEDULER_CLOCK) and not point["live_errors"]
        overhead_s = step_excess_s(live, sim)
        point["sim_overhead_s"] = overhead_s
        if overhead_s:  # diagnosis: is the gap the live stack's per-step overhead, or a different model?
            sim_oh = simulate_items(args.policy, items, args, overhead_ms=1e3 * overhead_s)
            for r in point["rows"]:
                r["sim_with_overhead"] = sim_oh.get(r["metric"])
                r["ratio_with_overhead"] = ratio(r["live"], sim_oh.get(r["metric"]))
        if lead is not None:  # what modelling planning ahead changes: the simulator deciding at each step's end
            sim_end = simulate_items(args.policy, items, args, at_step_end=True)
            for r in point["rows"]:
                r["sim_at_step_end"] = sim_end.get(r["metric"])
                r["ratio_at_step_end"] = ratio(r["live"], sim_end.get(r["metric"]))
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
          f"{'AGREES' if p['agrees'] else 'DISAGREES'} on the client's clock, "
          f"{'AGREES' if p.get('agrees_scheduler_clock') else 'DISAGREES'} on the scheduler's"
          + (f", {p['live_errors']} live errors" if p["live_errors"] else ""))
    if p.get("live_rpc_overhead_s") is not None:
        print(f"  live per step: {1e3 * p['live_rpc_overhead_s']:.2f} ms outside the executor, executor waited "
              f"{1e3 * (p.get('live_executor_wait_s') or 0):.2f} ms for each plan; sim+ovh adds "
              f"{1e3 * (p.get('sim_overhead_s') or 0):.2f} ms to every step (the live mean step's excess)")
    print(f"  {'metric':26s} {'live':>10s} {'sim':>10s} {'live/sim':>9s}  {'goal':12s} {'sim+ovh':>10s} "
          f"{'live/sim+ovh':>12s} {'sim@end':>10s} {'live/sim@end':>12s}")
    for r in p["rows"]:
        goal = "" if r["goal"] is None else f"±{100 * r['goal']:.0f}% {'ok' if r['ok'] else 'MISS'}"
        print(f"  {r['metric']:26s} {_fmt(r['live']):>10s} {_fmt(r['sim']):>10s} {_fmt(r['ratio']):>9s}  {goal:12s} "
              f"{_fmt(r.get('sim_with_overhead')):>10s} {_fmt(r.get('ratio_with_overhead')):>12s} "
              f"{_fmt(r.get('sim_at_step_end')):>10s} {_fmt(r.get('ratio_at_step_end')):>12s}")

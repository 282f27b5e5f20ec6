"""Command-line options shared by ``sim``, ``capacity`` and ``compare``."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from contract.cost_models import CostModel, resolve_cost_model
from contract.tiers import FREE_TBT_S, PAYING_TBT_S
from simulator.workloads import (
    PAPER_TRACE,
    clip_workload,
    clipped_rate_factor,
    length_pairs,
    make_workload,
    mean_lengths,
    resolve_trace,
)


def add_workload_arguments(p: argparse.ArgumentParser, num_requests: int = 2048) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=num_requests, help="requests per run (default %(default)s)")
    g.add_argument("--trace", default=None, metavar="PATH|paper",
                   help=f"length trace CSV; 'paper' = {PAPER_TRACE}"
                        f"{'' if PAPER_TRACE.is_file() else ' (not found here)'}; default: synthetic knots")
    g.add_argument("--seed", type=int, default=42, help="seed for lengths, arrivals and tiers (default 42)")
    g.add_argument("--clip-factor", type=float, default=3.0,
                   help="clip each Poisson gap at this / QPS (paper: 3); 0 disables")
    g.add_argument("--paying-prob", type=float, default=0.05, help="probability of the paying tier")
    g.add_argument("--paying-tbt", type=float, default=PAYING_TBT_S, help="paying tier TBT SLO, seconds")
    g.add_argument("--free-tbt", type=float, default=FREE_TBT_S, help="free tier TBT SLO, seconds")
    g.add_argument("--paying-ttft", type=float, default=0.0,
                   help="paying tier TTFT objective, seconds (0 = none, as in the paper); requests carry it to "
                        "the core, and the stable criterion holds the tier's P99 TTFT to it")
    g.add_argument("--free-ttft", type=float, default=0.0, help="free tier TTFT objective, seconds (0 = none)")
    g.add_argument("--steady-fraction", type=float, default=0.5,
                   help="the steady-state window: requests arriving after this share of the arrival span "
                        "(default 0.5: the second half)")
    g.add_argument("--max-prompt-len", type=int, default=0,
                   help="clip prompt lengths to this (0 = no cap); same as bench-serve's option")
    g.add_argument("--max-output-len", type=int, default=0,
                   help="clip output lengths to this (0 = no cap); same as bench-serve's option")
    g.add_argument("--shared-prefix-len", type=int, default=0, metavar="L",
                   help="prepend one of --num-prefixes shared prefixes of L tokens to every prompt "
                        "(synthetic token ids: exercises prefix caching; 0 = none)")
    g.add_argument("--num-prefixes", type=int, default=1, metavar="K",
                   help="distinct shared prefixes, drawn uniformly (with --shared-prefix-len; default 1)")
    g = p.add_argument_group("system")
    g.add_argument("--cost-model", default="paper", metavar="FILE|paper|gpu",
                   help="step-time model: 'paper' (built-in fit), 'gpu' (the paper fit plus per-decode, KV-context"
                        " and prefill/decode mixing costs) or a JSON model file")
    g.add_argument("--step-overhead-ms", type=float, default=None,
                   help="fixed per-step overhead added to the cost model's time (default: the model's own)")
    g.add_argument("--num-blocks", type=int, default=14733, help="KV blocks of 16 tokens (paper: 14733)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="SchedulerConfig override (repeatable), e.g. --set token_budget=1024")
    g.add_argument("--max-sim-time", type=float, default=None,
                   help="stop a run at this simulated time (requests still queued count as unfinished)")


def _non_negative(a: argparse.Namespace, name: str) -> float:
    v = float(getattr(a, name, 0.0) or 0.0)
    if not math.isfinite(v) or v < 0:
        raise SystemExit(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    return v


def _fraction(a: argparse.Namespace, name: str) -> float:
    v = float(getattr(a, name, 0.5))
    if not 0 <= v < 1:
        raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
    return v


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("executors (simulator/cluster.py)")
    g.add_argument("--executors", type=int, default=1,
                   help="simulated executors, each with its own core and KV pool; --qps is the total (default 1)")
    g.add_argument("--routing", default=None, choices=("least-work", "round-robin", "power-of-two"),
                   help="routing at admission (default least-work when --executors > 1); "
                        "with --pools, each pool's scheduler's rule")
    g.add_argument("--pools", type=int, default=1,
                   help="split the executors into this many pools (one scheduler each) behind gateways (default 1)")
    g.add_argument("--executors-per-pool", type=int, default=None,
                   help="executors in each pool (then --executors is ignored; default: --executors / --pools)")
    g.add_argument("--pool-routing", default="jsw", choices=("jsw", "p2c", "round-robin"),
                   help="the gateways' rule across pools (default %(default)s)")
    g.add_argument("--load-refresh-s", type=float, default=0.1,
                   help="how often each pool publishes its load to the gateways, s (0 = exact; default %(default)s)")
    g.add_argument("--gateways", type=int, default=1, help="gateways, arrivals spread in rotation (default 1)")


def pool_shape(a: argparse.Namespace) -> tuple[int, int]:
    """(pools, executors per pool) from ``--pools`` / ``--executors`` / ``--executors-per-pool``, checked."""
    pools = a.pools
    if pools < 1:
        raise SystemExit(f"--pools must be >= 1, got {pools}")
    if a.executors_per_pool is not None:
        per = a.executors_per_pool
    elif a.executors % pools:
        raise SystemExit(f"--executors {a.executors} does not split evenly into --pools {pools}")
    else:
        per = a.executors // pools
    if per < 1:
        raise SystemExit(f"need at least one executor per pool, got {per}")
    if not (math.isfinite(a.load_refresh_s) and a.load_refresh_s >= 0):
        raise SystemExit(f"--load-refresh-s must be a finite number >= 0, got {a.load_refresh_s}")
    if a.gateways < 1:
        raise SystemExit(f"--gateways must be >= 1, got {a.gateways}")
    return pools, per


@dataclass(frozen=True)
class RunSpec:
    """Everything one simulation needs besides the policy and QPS (picklable for workers)."""

    num_requests: int
    trace: str | None
    seed: int
    clip_factor: float | None
    paying_prob: float
    paying_tbt: float
    free_tbt: float
    cost_model: CostModel
    num_blocks: int
    overrides: tuple[str, ...]
    max_sim_time: float | None = None
    max_prompt_len: int = 0  # 0 = no cap (bench-serve's --max-prompt-len)
    max_output_len: int = 0
    shared_prefix_len: int = 0  # 0 = no shared prefixes (no token ids)
    num_prefixes: int = 1
    paying_ttft: float = 0.0  # TTFT objectives of the tiers, 0 = none
    free_ttft: float = 0.0
    steady_fraction: float = 0.5  # the metrics' steady-state window (simulator/metrics.py)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> RunSpec:
        if a.trace not in (None, "", "synthetic"):
            resolve_trace(a.trace)  # fail fast on a missing file
        if getattr(a, "shared_prefix_len", 0) < 0 or getattr(a, "num_prefixes", 1) < 1:
            raise SystemExit("--shared-prefix-len must be >= 0 and --num-prefixes >= 1")
        return cls(num_requests=a.num_requests, trace=a.trace, seed=a.seed,
                   clip_factor=a.clip_factor if a.clip_factor and a.clip_factor > 0 else None,
                   paying_prob=a.paying_prob, paying_tbt=a.paying_tbt, free_tbt=a.free_tbt,
                   cost_model=resolve_cost_model(a.cost_model, a.step_overhead_ms), num_blocks=a.num_blocks,
                   overrides=tuple(a.overrides), max_sim_time=a.max_sim_time,
                   max_prompt_len=getattr(a, "max_prompt_len", 0) or 0,
                   max_output_len=getattr(a, "max_output_len", 0) or 0,
                   shared_prefix_len=getattr(a, "shared_prefix_len", 0) or 0,
                   num_prefixes=getattr(a, "num_prefixes", 1) or 1,
                   paying_ttft=_non_negative(a, "paying_ttft"), free_ttft=_non_negative(a, "free_ttft"),
                   steady_fraction=_fraction(a, "steady_fraction"))

    def ttft_objectives(self) -> tuple[tuple[str, float], ...]:
        """(tier, TTFT objective) for the tiers that have one."""
        return tuple((t, v) for t, v in (("paying", self.paying_ttft), ("free", self.free_ttft)) if v > 0)

    def workload(self, qps: float):
        items = make_workload(self.num_requests, qps, seed=self.seed, trace=self.trace,
                              clip_factor=self.clip_factor, paying_prob=self.paying_prob,
                              paying_tbt_s=self.paying_tbt, free_tbt_s=self.free_tbt,
                              shared_prefix_len=self.shared_prefix_len,
                              num_prefixes=self.num_prefixes if self.shared_prefix_len else 0,
                              paying_ttft_s=self.paying_ttft or None, free_ttft_s=self.free_ttft or None)
        return clip_workload(items, self.max_prompt_len, self.max_output_len)

    def describe(self) -> dict[str, Any]:
        d = {"num_requests": self.num_requests, "trace": self.trace or "synthetic", "seed": self.seed,
             "clip_factor": self.clip_factor, "paying_prob": self.paying_prob,
             "cost_model": self.cost_model.to_dict(), "num_blocks": self.num_blocks,
             "overrides": list(self.overrides), "max_prompt_len": self.max_prompt_len,
             "max_output_len": self.max_output_len, "paying_ttft": self.paying_ttft,
             "free_ttft": self.free_ttft, "steady_fraction": self.steady_fraction}
        if self.shared_prefix_len:  # (absent otherwise: earlier outputs keep their keys)
            d.update(shared_prefix_len=self.shared_prefix_len, num_prefixes=self.num_prefixes)
        return d


def stability_bound(spec: RunSpec, policy: str = "slai") -> dict[str, float]:
    """Li, Dai, Peng (arXiv 2504.07347): lambda * (mean P + mean D) < b / t_b.

    b = the token budget, t_b = the cost model's time of one full b-token step.
    Reported as an effective arrival rate and as the nominal QPS that produces it
    under gap clipping.

    A cost model that also charges per decode, per token of decode context or per
    (chunk x context) pair (the GPU-shaped one) makes a request's work
    ``(P + D) t_b / b`` plus those terms at their least (``CostModel.request_extra_ms``),
    and the bound is ``lambda * E[work] < 1``; ``extra_work_s`` is that mean addition.
    Without such terms (the paper's fit) the bound and its keys are as before.

    b is the policy's ``token_budget``: a policy that takes bigger steps
    (``max_token_budget``, as ``slai-adaptive`` does while KV allows) amortises the
    per-step cost further and can serve somewhat above it (docs/results.md).
    """
    from simulator.sim import build_core

    b = build_core(policy, spec.num_blocks, spec.overrides).config.token_budget
    model = spec.cost_model
    t_b = model.full_step_s(b)
    pairs = length_pairs(spec.trace, spec.seed, max_prompt=spec.max_prompt_len, max_output=spec.max_output_len)
    mp, md = mean_lengths(pairs)
    out: dict[str, float] = {"token_budget": b, "t_b_s": t_b, "tokens_per_s": b / t_b, "mean_prompt": mp,
                             "mean_output": md}
    if model.c_ms_per_decode or model.d_ms_per_context_token or model.e_ms_per_chunk_context:
        extra = 1e-3 * sum(model.request_extra_ms(p, d) for p, d in pairs) / len(pairs)
        lam = 1.0 / ((mp + md) * t_b / b + extra)
        out["extra_work_s"] = extra
    else:
        lam = b / t_b / (mp + md)
    out["lambda_max_effective_qps"] = lam
    out["lambda_max_nominal_qps"] = lam / clipped_rate_factor(spec.clip_factor)
    return out


def clean_json(obj: Any) -> Any:
    """Replace NaN/inf by None so the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj

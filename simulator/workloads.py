"""Seeded workloads: arrival times x request lengths x tiers, as in the paper's experiments.

One function, :func:`make_workload`, returns a list of :class:`WorkloadItem`
shared by the simulator and the live load generator:

* lengths come from the paper's ShareGPT trace CSV (columns
  ``num_prefill_tokens, num_decode_tokens, ...``), shuffled with the seed, or,
  without a trace, from an inverse-CDF generator on that trace's quantile
  knots (prompt and output drawn independently: their correlation there is 0.04);
* arrivals are Poisson at ``qps``; each inter-arrival gap is clipped at
  ``clip_factor / qps`` (the authors' generator clips at 3/QPS, so the effective
  rate is 1 / (1 - e^-3) = 1.052x nominal; :func:`effective_qps` reports it);
* each request is paying with probability ``paying_prob`` (TBT SLO 0.1 s),
  otherwise free (0.5 s); a tier may also carry a TTFT objective
  (``paying_ttft_s`` / ``free_ttft_s``, None by default, as in the paper);
* optionally (``shared_prefix_len`` L, ``num_prefixes`` K) every prompt starts with
  one of K shared prefixes of L tokens (a system prompt, drawn uniformly), followed
  by its own trace-length prompt: requests then carry synthetic token ids, so the
  core's prefix cache (docs/scheduler.md) finds the shared blocks.

Three independent streams are derived from the one seed (lengths, gaps, tiers),
so changing the rate does not change which requests are paying.

No grpc or torch here. The trace file is read in place and never copied.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from contract.tiers import FREE_TBT_S, PAYING_TBT_S, Tier
from scheduler_svc.core.request import Request
from scheduler_svc.core.token_ids import TokenIds

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_TRACE_NAME = "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
PAPER_TRACE = REPO_ROOT.parent / "shared" / "data" / PAPER_TRACE_NAME

# the paper's trace: percentile (0-100) -> prompt / decode length knots (linear interpolation)
KNOT_Q = (0, 1, 5, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 95, 99, 99.9, 100)
KNOT_P = (1, 12, 29, 74, 382, 580, 777, 1203, 1730, 2401, 3235, 3734.5, 4278, 5696, 6563, 7433.7, 7853.5, 8141)
KNOT_D = (2, 6, 44, 84, 181, 228, 271, 346, 415, 493, 581, 628, 683, 834, 920, 998, 1021, 1024)



@dataclass(frozen=True, slots=True)
class WorkloadItem:
    """One request to send: when, how long, which tier."""

    req_id: str
    arrival_s: float  # seconds from the start of the run
    prompt_len: int
    output_len: int
    tier: str  # "paying" | "free"
    tbt_slo_s: float
    prefix_id: int = -1  # which shared prefix the prompt starts with (-1: none)
    prefix_len: int = 0  # its length, included in prompt_len
    uid: int = 0  # distinguishes this request's own tokens from every other's
    ttft_slo_s: float | None = None  # the tier's TTFT objective, if it has one

    def to_request(self) -> Request:
        """The core's request for this item: no token ids, unless it has a shared prefix."""
        ids = None
        if self.prefix_id >= 0:
            # synthetic ids: the prefix's tokens are distinct per prefix, the rest per request
            n_pre = min(self.prefix_len, self.prompt_len)  # (a clipped prompt keeps part of its prefix)
            base = 1 + (self.prefix_id + 1) * 100_000
            ids = TokenIds(range(base, base + n_pre))
            ids.extend([2_000_000_000 + self.uid] * (self.prompt_len - n_pre))
        return Request(req_id=self.req_id, num_prompt_tokens=self.prompt_len, max_tokens=self.output_len,
                       arrival_s=self.arrival_s, tier=Tier.PAYING if self.tier == "paying" else Tier.FREE,
                       tbt_slo_s=self.tbt_slo_s, ttft_slo_s=self.ttft_slo_s, prompt_token_ids=ids)


def resolve_trace(spec: str | None) -> Path | None:
    """``None``/``"synthetic"`` -> no trace; ``"paper"`` -> the shared ShareGPT CSV; else a path."""
    if spec in (None, "", "synthetic", "none"):
        return None
    path = PAPER_TRACE if spec == "paper" else Path(spec)
    if not path.is_file():
        hint = f" (the paper trace is looked up at {PAPER_TRACE})" if spec == "paper" else ""
        raise FileNotFoundError(f"trace {spec!r} not found{hint}")
    return path


@lru_cache(maxsize=4)
def load_trace(path: str | Path) -> tuple[tuple[int, int], ...]:
    """(prompt, output) pairs from a trace CSV with num_prefill_tokens, num_decode_tokens."""
    pairs = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            pairs.append((int(float(row["num_prefill_tokens"])), int(float(row["num_decode_tokens"]))))
    if not pairs:
        raise ValueError(f"trace {path} has no rows")
    return tuple(pairs)


def trace_lengths(path: str | Path, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` (prompt, output) pairs: the trace shuffled with ``rng`` (reshuffled per pass if n > rows)."""
    pairs = load_trace(str(path))
    out: list[tuple[int, int]] = []
    while len(out) < n:
        idx = rng.permutation(len(pairs))
        out.extend(pairs[i] for i in idx[: n - len(out)])
    return [(max(1, p), max(1, d)) for p, d in out]


def synthetic_lengths(n: int, rng: np.random.Generator, max_total: int | None = 8192) -> list[tuple[int, int]]:
    """Inverse-CDF draws through the trace's quantile knots (``KNOT_*``); P and D independent.

    A prompt is shortened so that prompt + output <= ``max_total`` (the core would
    otherwise ignore the request); this touches well under 1% of draws.
    """
    u = rng.uniform(0.0, 100.0, (n, 2))  # row i = request i: a prefix of a longer draw is the same
    u_p, u_d = u[:, 0], u[:, 1]
    p = np.maximum(1, np.rint(np.interp(u_p, KNOT_Q, KNOT_P))).astype(int)
    d = np.maximum(1, np.rint(np.interp(u_d, KNOT_Q, KNOT_D))).astype(int)
    if max_total is not None:
        p = np.maximum(1, np.minimum(p, max_total - d))
    return list(zip(p.tolist(), d.tolist()))


def poisson_arrivals(n: int, qps: float, rng: np.random.Generator, clip_factor: float | None = 3.0) -> list[float]:
    """Arrival times of a Poisson process at ``qps``; each gap clipped at ``clip_factor / qps``."""
    if qps <= 0:
        raise ValueError(f"qps must be > 0, got {qps}")
    gaps = rng.exponential(1.0 / qps, n)
    if clip_factor is not None:
        gaps = np.minimum(gaps, clip_factor / qps)
    return np.cumsum(gaps).tolist()


def clipped_rate_factor(clip_factor: float | None) -> float:
    """Effective / nominal rate of clipped exponential gaps: 1 / (1 - e^-c)."""
    return 1.0 if clip_factor is None else 1.0 / (1.0 - math.exp(-clip_factor))


def effective_qps(items: list[WorkloadItem]) -> float:
    """Measured arrival rate: requests / time of the last arrival (gaps start at t = 0)."""
    if not items:
        return 0.0
    last = max(it.arrival_s for it in items)
    return len(items) / last if last > 0 else math.inf


def make_workload(num_requests: int, qps: float, seed: int = 42, trace: str | Path | None = None,
                  clip_factor: float | None = 3.0, paying_prob: float = 0.05,
                  paying_tbt_s: float = PAYING_TBT_S, free_tbt_s: float = FREE_TBT_S,
                  max_total: int | None = 8192, shared_prefix_len: int = 0,
                  num_prefixes: int = 0, paying_ttft_s: float | None = None,
                  free_ttft_s: float | None = None) -> list[WorkloadItem]:
    """The paper's workload: ``num_requests`` items sorted by arrival.

    ``trace``: a CSV path, ``"paper"``, or ``None`` for the synthetic generator.
    ``clip_factor``: clip each gap at clip_factor/qps (None: pure Poisson).
    ``shared_prefix_len`` > 0: each prompt is one of ``num_prefixes`` shared prefixes
    of that many tokens followed by its trace-length prompt (shortened so that
    prompt + output <= ``max_total``), with synthetic token ids.
    ``paying_ttft_s`` / ``free_ttft_s``: the tiers' TTFT objectives (None: none; 0 counts as none).
    """
    if num_requests < 0:
        raise ValueError("num_requests must be >= 0")
    if not 0 <= paying_prob <= 1:
        raise ValueError("paying_prob must be in [0, 1]")
    if shared_prefix_len < 0 or num_prefixes < 0:
        raise ValueError("shared_prefix_len and num_prefixes must be >= 0")
    if shared_prefix_len and not num_prefixes:
        raise ValueError("num_prefixes must be >= 1 with a shared_prefix_len")
    ss = np.random.SeedSequence(seed)
    len_ss, gap_ss, tier_ss = ss.spawn(3)
    path = resolve_trace(trace) if isinstance(trace, str) or trace is None else Path(trace)
    rng_len = np.random.default_rng(len_ss)
    lengths = trace_lengths(path, num_requests, rng_len) if path else synthetic_lengths(num_requests, rng_len,
                                                                                         max_total)
    arrivals = poisson_arrivals(num_requests, qps, np.random.default_rng(gap_ss), clip_factor)
    paying = np.random.default_rng(tier_ss).random(num_requests) < paying_prob
    prefix_ids = None
    if shared_prefix_len:  # a fourth stream: the other three stay what they were
        prefix_ids = np.random.default_rng(ss.spawn(1)[0]).integers(0, num_prefixes, num_requests).tolist()
    items = []
    for i in range(num_requests):
        p, d = lengths[i]
        is_paying = bool(paying[i])
        extra = {}
        if prefix_ids is not None:
            if max_total is not None:
                p = max(1, min(p, max_total - shared_prefix_len - d))
            p += shared_prefix_len
            extra = {"prefix_id": prefix_ids[i], "prefix_len": shared_prefix_len, "uid": i}
        items.append(WorkloadItem(
            req_id=f"r{i}", arrival_s=arrivals[i], prompt_len=int(p), output_len=int(d),
            tier="paying" if is_paying else "free", tbt_slo_s=paying_tbt_s if is_paying else free_tbt_s,
            ttft_slo_s=(paying_ttft_s if is_paying else free_ttft_s) or None, **extra))
    return items


def clip_lengths(prompt_len: int, output_len: int, max_prompt: int = 0, max_output: int = 0,
                 max_total: int | None = None) -> tuple[int, int]:
    """Cap a request's lengths: prompt at ``max_prompt``, output at ``max_output`` (0 = no cap), then
    prompt + output at ``max_total`` (the model length) by shortening the prompt first. Both stay >= 1."""
    if max_prompt:
        prompt_len = min(prompt_len, max_prompt)
    if max_output:
        output_len = min(output_len, max_output)
    prompt_len, output_len = max(1, prompt_len), max(1, output_len)
    if max_total and prompt_len + output_len > max_total:  # keep the output, shorten the prompt
        prompt_len = max(1, max_total - output_len)
        output_len = min(output_len, max_total - prompt_len)
    return prompt_len, output_len


def clip_workload(items: list[WorkloadItem], max_prompt: int = 0, max_output: int = 0,
                  max_total: int | None = None) -> list[WorkloadItem]:
    """``items`` with lengths passed through :func:`clip_lengths` (arrivals and tiers unchanged).

    ``slai-serve bench-serve`` clips each request the same way before sending it, so
    ``sim`` and ``bench-serve`` with the same ``--max-prompt-len``/``--max-output-len``
    replay the same requests.
    """
    if not (max_prompt or max_output or max_total):
        return list(items)
    out = []
    for it in items:
        p, d = clip_lengths(it.prompt_len, it.output_len, max_prompt, max_output, max_total)
        out.append(it if (p, d) == (it.prompt_len, it.output_len) else replace(it, prompt_len=p, output_len=d))
    return out


def workload_stats(items: list[WorkloadItem]) -> dict[str, float]:
    """Means used by the stability bound and reports."""
    n = len(items)
    if n == 0:
        return {"num_requests": 0, "mean_prompt": 0.0, "mean_output": 0.0, "paying_fraction": 0.0}
    return {
        "num_requests": n,
        "mean_prompt": sum(it.prompt_len for it in items) / n,
        "mean_output": sum(it.output_len for it in items) / n,
        "paying_fraction": sum(it.tier == "paying" for it in items) / n,
    }


def length_pairs(trace: str | Path | None, seed: int = 42, n_synthetic: int = 200_000,
                 max_prompt: int = 0, max_output: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) lengths of the length source: the whole trace, or a large synthetic draw,
    after :func:`clip_lengths` with ``max_prompt``/``max_output`` (0 = no cap)."""
    path = resolve_trace(trace) if isinstance(trace, str) or trace is None else Path(trace)
    if path is not None:
        pairs = load_trace(str(path))
    else:
        pairs = synthetic_lengths(n_synthetic, np.random.default_rng(seed))
    if max_prompt or max_output:
        pairs = [clip_lengths(p, d, max_prompt, max_output) for p, d in pairs]
    return pairs


def mean_lengths(pairs: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """Mean (prompt, output) of (prompt, output) pairs, e.g. :func:`length_pairs`'s."""
    return (sum(p for p, _ in pairs) / len(pairs), sum(d for _, d in pairs) / len(pairs))

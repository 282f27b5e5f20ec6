"""Latency and throughput metrics: ONE definition for the simulator and live runs.

Definitions:

* **TTFT** = first output token's time - the request's arrival time.
* **TBT**  = gap between consecutive output tokens of one request. The first
  token contributes no TBT sample (no artificial zeros); gaps that span a
  preemption are included (they are real stalls). Tokens delivered together in
  one event have the same time, so the 2nd.. of them contribute 0-gaps (real
  zeros, not artificial ones; the simulator always delivers one token per event).
* **P50/P99** use linear interpolation between order statistics (numpy default);
  TBT percentiles are pooled over all tokens of a tier (not per request).
* **SLO attainment** of a tier = share of its TBT samples <= the request's TBT SLO.
* **E2E** = last token's time - arrival.
* **Throughput** = output tokens / makespan, and (prompt + output) tokens /
  makespan, where makespan = last token time - first arrival time.
* **Keeping up**: ``drain_s`` = last token time - last arrival time (how long the
  backlog takes to clear once arrivals stop) and ``throughput_ratio`` = finished
  requests per second over the makespan / offered requests per second over the
  arrival span (1.0: the system finished as fast as requests came).
* **Steady-state window**: with ``steady_from_s`` set, the requests arriving at or
  after it are also summarised on their own under ``"steady"`` (TTFT, per-tier
  TTFT and TBT tails). A finite run that ends with an idle drain flatters a
  policy that lets a backlog build; the late window does not (docs/results.md,
  "Stable capacity").

Feed a :class:`MetricsCollector` with ``register`` (one per request) and either
``on_token(req_id, t, n)`` calls (live load generator: client-side timestamps)
or ``on_event(TokenEvent)`` (simulator: scheduler clock). ``summary()`` returns
a flat, JSON-ready dict. No grpc or torch here.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

TIERS = ("paying", "free")


@dataclass(slots=True)
class RequestRecord:
    req_id: str
    arrival_s: float
    tier: str
    tbt_slo_s: float
    prompt_len: int = 0
    output_len: int = 0  # wanted
    num_tokens: int = 0  # received so far
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_reason: str | None = None
    num_tbt_violations: int = 0
    max_tbt_s: float = 0.0
    steady: bool = False  # arrived in the steady-state window
    samples: array | None = None  # where this request's TBT samples go (its tier's, split by window)


def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if a.size else None


class MetricsCollector:
    """Accumulates per-token timestamps into per-request records and per-tier TBT samples.

    ``steady_from_s``: requests arriving at or after it form the steady-state
    window, summarised again on their own (``summary()["steady"]``); set it
    before the first ``register``.
    """

    def __init__(self, steady_from_s: float | None = None) -> None:
        self.records: dict[str, RequestRecord] = {}
        self.steady_from_s = steady_from_s
        # (tier, in the steady window) -> TBT samples; a tier's samples are the two parts together
        self._tbt: dict[tuple[str, bool], array] = {(t, w): array("d") for t in TIERS for w in (False, True)}
        self.num_preemptions = 0

    def register(self, req_id: str, arrival_s: float, tier: str, tbt_slo_s: float, prompt_len: int = 0,
                 output_len: int = 0) -> None:
        steady = self.steady_from_s is not None and arrival_s >= self.steady_from_s
        samples = self._tbt.get((tier, steady))
        if samples is None:
            samples = self._tbt[(tier, steady)] = array("d")
            self._tbt.setdefault((tier, not steady), array("d"))
        self.records[req_id] = RequestRecord(req_id, arrival_s, tier, tbt_slo_s, prompt_len, output_len,
                                             steady=steady, samples=samples)

    def on_token(self, req_id: str, t: float, n: int = 1, finish_reason: str | None = None) -> None:
        """``n`` output tokens of ``req_id`` delivered at time ``t``."""
        rec = self.records[req_id]
        if n > 0:
            if rec.last_token_s is None:
                rec.first_token_s = t
                gaps = n - 1
                gap = 0.0
            else:
                gaps = n
                gap = t - rec.last_token_s
            if gaps:
                samples = rec.samples
                samples.append(gap)
                if gaps > 1:
                    samples.extend([0.0] * (gaps - 1))
                if gap > rec.tbt_slo_s:
                    rec.num_tbt_violations += 1
                if gap > rec.max_tbt_s:
                    rec.max_tbt_s = gap
            rec.last_token_s = t
            rec.num_tokens += n
        if finish_reason is not None:
            rec.finish_reason = finish_reason

    def on_step_events(self, events: Iterable[Any], t: float) -> None:
        """``on_token(ev.req_id, t, 1, ev.finish_reason)`` for each core ``TokenEvent`` of one simulated step
        (one token each), in one call: the simulator's per-token hot path."""
        records = self.records
        # NOTE: fields by index (a TokenEvent is a NamedTuple: ev[0] req_id, ev[2] finish_reason), cheaper
        for ev in events:
            rec = records[ev[0]]
            last = rec.last_token_s
            if last is None:
                rec.first_token_s = t
            else:
                gap = t - last
                rec.samples.append(gap)  # its tier's samples, in or out of the steady window
                if gap > rec.tbt_slo_s:
                    rec.num_tbt_violations += 1
                if gap > rec.max_tbt_s:
                    rec.max_tbt_s = gap
            rec.last_token_s = t
            rec.num_tokens += 1
            if ev[2] is not None:
                rec.finish_reason = ev[2]

    def on_event(self, ev: Any) -> None:
        """A core ``TokenEvent`` (duck-typed: req_id, token_ids, time_s, finish_reason)."""
        self.on_token(ev.req_id, ev.time_s, len(ev.token_ids), ev.finish_reason)

    @property
    def tiers(self) -> list[str]:
        return list(dict.fromkeys(t for t, _ in self._tbt))

    def tbt_samples(self, tier: str | None = None, steady_only: bool = False) -> np.ndarray:
        """TBT samples of ``tier`` (None: all tiers); ``steady_only``: of steady-window requests only."""
        parts = [np.frombuffer(a, dtype=float) for (t, w), a in self._tbt.items()
                 if len(a) and (tier is None or t == tier) and (w or not steady_only)]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0)

    # ---- summary ----
    def summary(self) -> dict[str, Any]:
        recs = list(self.records.values())
        done = [r for r in recs if r.first_token_s is not None]
        ttft_all = np.array([r.first_token_s - r.arrival_s for r in done])
        e2e = np.array([r.last_token_s - r.arrival_s for r in done])
        out: dict[str, Any] = {
            "num_requests": len(recs),
            "num_finished": sum(1 for r in recs if r.finish_reason in ("length", "stop")),
            "num_ignored": sum(1 for r in recs if r.finish_reason == "ignored"),
            "num_unfinished": sum(1 for r in recs if r.finish_reason is None),
            "ttft_p50_s": _pct(ttft_all, 50),
            "ttft_p99_s": _pct(ttft_all, 99),
            "ttft_mean_s": float(ttft_all.mean()) if ttft_all.size else None,
            "e2e_p50_s": _pct(e2e, 50),
            "e2e_p99_s": _pct(e2e, 99),
        }
        all_tbt = self.tbt_samples()
        out["tbt_p50_s"] = _pct(all_tbt, 50)
        out["tbt_p99_s"] = _pct(all_tbt, 99)
        by = {k: {} for k in ("ttft_p50_s_by_tier", "ttft_p99_s_by_tier", "ttft_mean_s_by_tier",
                              "tbt_p50_s_by_tier", "tbt_p99_s_by_tier", "tbt_max_s_by_tier",
                              "slo_attainment_by_tier", "num_requests_by_tier")}
        for tier in self.tiers:
            trs = [r for r in done if r.tier == tier]
            tt = np.array([r.first_token_s - r.arrival_s for r in trs])
            by["ttft_p50_s_by_tier"][tier] = _pct(tt, 50)
            by["ttft_p99_s_by_tier"][tier] = _pct(tt, 99)
            by["ttft_mean_s_by_tier"][tier] = float(tt.mean()) if tt.size else None
            s = self.tbt_samples(tier)
            by["tbt_p50_s_by_tier"][tier] = _pct(s, 50)
            by["tbt_p99_s_by_tier"][tier] = _pct(s, 99)
            by["tbt_max_s_by_tier"][tier] = float(s.max()) if s.size else None
            by["num_requests_by_tier"][tier] = sum(1 for r in recs if r.tier == tier)
            # attainment: share of samples <= the request's own SLO (one SLO per tier in practice)
            n_samples = s.size
            n_viol = sum(r.num_tbt_violations for r in recs if r.tier == tier)
            by["slo_attainment_by_tier"][tier] = (1.0 - n_viol / n_samples) if n_samples else None
        out.update(by)
        if done:
            start = min(r.arrival_s for r in recs)
            end = max(r.last_token_s for r in done)
            makespan = end - start
            out_tokens = sum(r.num_tokens for r in recs)
            in_tokens = sum(r.prompt_len for r in done)
            out["makespan_s"] = makespan
            out["num_output_tokens"] = out_tokens
            out["throughput_tokens_per_s"] = out_tokens / makespan if makespan > 0 else None
            out["throughput_total_tokens_per_s"] = (out_tokens + in_tokens) / makespan if makespan > 0 else None
            out["throughput_requests_per_s"] = out["num_finished"] / makespan if makespan > 0 else None
        else:
            out.update(makespan_s=0.0, num_output_tokens=0, throughput_tokens_per_s=None,
                       throughput_total_tokens_per_s=None, throughput_requests_per_s=None)
        out.update(self._keeping_up(recs, done))
        if self.steady_from_s is not None:
            out["steady"] = self._steady_summary(recs)
        out["num_preemptions"] = self.num_preemptions
        return out

    def _keeping_up(self, recs: list[RequestRecord], done: list[RequestRecord]) -> dict[str, Any]:
        """``drain_s`` and ``throughput_ratio`` (module docstring); None until every request finished."""
        out: dict[str, Any] = {"last_arrival_s": max((r.arrival_s for r in recs), default=None),
                               "drain_s": None, "throughput_ratio": None}
        if not recs or len(done) < len(recs):
            return out
        first, last = min(r.arrival_s for r in recs), out["last_arrival_s"]
        end = max(r.last_token_s for r in done)
        out["drain_s"] = end - last
        finished = sum(1 for r in recs if r.finish_reason in ("length", "stop"))
        if end > first and last > first:
            out["throughput_ratio"] = (finished / (end - first)) / (len(recs) / (last - first))
        return out

    def _steady_summary(self, recs: list[RequestRecord]) -> dict[str, Any]:
        """TTFT and TBT tails of the requests arriving in the steady-state window."""
        win = [r for r in recs if r.steady]
        done = [r for r in win if r.first_token_s is not None]
        tt = np.array([r.first_token_s - r.arrival_s for r in done])
        out: dict[str, Any] = {"from_s": self.steady_from_s, "num_requests": len(win),
                               "num_unfinished": sum(1 for r in win if r.finish_reason is None),
                               "ttft_p50_s": _pct(tt, 50), "ttft_p99_s": _pct(tt, 99),
                               "ttft_p99_s_by_tier": {}, "tbt_p99_s_by_tier": {}, "num_requests_by_tier": {}}
        for tier in self.tiers:
            t_tier = np.array([r.first_token_s - r.arrival_s for r in done if r.tier == tier])
            out["ttft_p99_s_by_tier"][tier] = _pct(t_tier, 99)
            out["tbt_p99_s_by_tier"][tier] = _pct(self.tbt_samples(tier, steady_only=True), 99)
            out["num_requests_by_tier"][tier] = sum(1 for r in win if r.tier == tier)
        return out


def steady_window_start(arrivals: Iterable[float], fraction: float = 0.5) -> float | None:
    """Start of the steady-state window: ``fraction`` of the way from the first to the last arrival
    (0.5: requests arriving in the second half of the run). None without arrivals."""
    if not 0 <= fraction < 1:
        raise ValueError(f"steady window fraction must be in [0, 1), got {fraction}")
    a = list(arrivals)
    if not a:
        return None
    first, last = min(a), max(a)
    return first + fraction * (last - first)


def from_timestamps(requests: Iterable[dict[str, Any]]) -> MetricsCollector:
    """Build a collector from per-request token timestamps.

    Each item: {"req_id", "arrival_s", "tier", "tbt_slo_s", "token_times": [...],
    optional "prompt_len", "output_len", "finish_reason"}.
    """
    c = MetricsCollector()
    for r in requests:
        c.register(r["req_id"], r["arrival_s"], r["tier"], r["tbt_slo_s"], r.get("prompt_len", 0),
                   r.get("output_len", 0))
        times = list(r["token_times"])
        for i, t in enumerate(times):
            last = i == len(times) - 1
            c.on_token(r["req_id"], t, 1, r.get("finish_reason", "length") if last else None)
    return c


def _rel(v: float | None, lim: float) -> float:
    """Relative slack ``(limit - value) / limit``; a missing value counts as violated."""
    return -math.inf if v is None else (lim - v) / lim


@dataclass(frozen=True, slots=True)
class SloCriterion:
    """The paper's capacity criterion: pooled median TTFT + per-tier P99 TBT (see simulator/capacity.py)."""

    name = "paper"

    ttft_p50_max_s: float = 0.5  # strict: median TTFT < this
    tbt_p99_max_paying_s: float = 0.1  # P99 TBT of paying <= this
    tbt_p99_max_free_s: float = 0.5

    def margins(self, s: dict[str, Any]) -> dict[str, float]:
        """Relative slack of each condition ((limit - value) / limit); negative = violated."""
        tbt = s.get("tbt_p99_s_by_tier", {})
        m = {"ttft_p50": _rel(s.get("ttft_p50_s"), self.ttft_p50_max_s)}
        if tbt.get("paying") is not None:
            m["tbt_p99_paying"] = _rel(tbt["paying"], self.tbt_p99_max_paying_s)
        if tbt.get("free") is not None:
            m["tbt_p99_free"] = _rel(tbt["free"], self.tbt_p99_max_free_s)
        return m

    def passes(self, s: dict[str, Any]) -> bool:
        if s.get("num_unfinished", 0):
            return False
        m = self.margins(s)
        return m["ttft_p50"] > 0 and all(v >= 0 for k, v in m.items() if k != "ttft_p50")

    def margin(self, s: dict[str, Any]) -> float:
        """The binding (smallest) margin; > 0 roughly means pass."""
        return min(self.margins(s).values())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "ttft_p50_max_s": self.ttft_p50_max_s,
                "tbt_p99_max_paying_s": self.tbt_p99_max_paying_s, "tbt_p99_max_free_s": self.tbt_p99_max_free_s}


@dataclass(frozen=True, slots=True)
class StableCriterion:
    """The stable capacity criterion: the paper's objectives, and the system keeps up.

    A load passes when, besides ``paper`` over the whole run,

    * the paper's objectives also hold over the steady-state window
      (``summary()["steady"]``, e.g. requests arriving in the second half);
    * a TTFT tail objective holds over the run and over the window: P99 TTFT
      <= ``ttft_p99_max_s``, and per tier P99 TTFT <= the tier's own TTFT
      objective where it has one (``ttft_p99_max_by_tier``);
    * the system keeps up: the last request finishes within ``drain_max_s``
      of the last arrival, or finished requests per second reach
      ``min_throughput_ratio`` of the offered rate.

    A median-only criterion over a finite run can be passed by starving long
    prompts and draining the backlog after the arrivals stop; each condition
    above fails in that case (docs/results.md, "Stable capacity").
    """

    paper: SloCriterion = SloCriterion()
    ttft_p99_max_s: float = 10.0
    ttft_p99_max_by_tier: tuple[tuple[str, float], ...] = ()  # (tier, TTFT objective) for tiers with one
    drain_max_s: float = 120.0
    min_throughput_ratio: float = 0.97

    name = "stable"

    def _tails(self, s: dict[str, Any]) -> dict[str, float]:
        m = {"ttft_p99": _rel(s.get("ttft_p99_s"), self.ttft_p99_max_s)}
        by = s.get("ttft_p99_s_by_tier") or {}
        for tier, lim in self.ttft_p99_max_by_tier:
            if tier in by and (s.get("num_requests_by_tier") or {}).get(tier, 1):
                m[f"ttft_p99_{tier}"] = _rel(by[tier], lim)
        return m

    def margins(self, s: dict[str, Any]) -> dict[str, float]:
        """Relative slack of each condition; ``steady.*`` are the window's, ``keeps_up`` the better of
        the drain time's and the throughput ratio's."""
        m = {**self.paper.margins(s), **self._tails(s)}
        w = s.get("steady")
        if w is not None:
            for k, v in {**self.paper.margins(w), **self._tails(w)}.items():
                m[f"steady.{k}"] = v
        drain, ratio = s.get("drain_s"), s.get("throughput_ratio")
        m["keeps_up"] = max(_rel(drain, self.drain_max_s),
                            -math.inf if ratio is None else (ratio - self.min_throughput_ratio) / self.min_throughput_ratio)
        return m

    def passes(self, s: dict[str, Any]) -> bool:
        if s.get("num_unfinished", 0) or (s.get("steady") or {}).get("num_unfinished", 0):
            return False
        strict = ("ttft_p50", "steady.ttft_p50")
        return all((v > 0) if k in strict else (v >= 0) for k, v in self.margins(s).items())

    def margin(self, s: dict[str, Any]) -> float:
        return min(self.margins(s).values())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "ttft_p50_max_s": self.paper.ttft_p50_max_s,
                "tbt_p99_max_paying_s": self.paper.tbt_p99_max_paying_s,
                "tbt_p99_max_free_s": self.paper.tbt_p99_max_free_s, "ttft_p99_max_s": self.ttft_p99_max_s,
                "ttft_p99_max_by_tier": dict(self.ttft_p99_max_by_tier), "drain_max_s": self.drain_max_s,
                "min_throughput_ratio": self.min_throughput_ratio}

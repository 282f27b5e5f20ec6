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


def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if a.size else None


class MetricsCollector:
    """Accumulates per-token timestamps into per-request records and per-tier TBT samples."""

    def __init__(self) -> None:
        self.records: dict[str, RequestRecord] = {}
        self._tbt: dict[str, array] = {t: array("d") for t in TIERS}
        self.num_preemptions = 0

    def register(self, req_id: str, arrival_s: float, tier: str, tbt_slo_s: float, prompt_len: int = 0,
                 output_len: int = 0) -> None:
        if tier not in self._tbt:
            self._tbt[tier] = array("d")
        self.records[req_id] = RequestRecord(req_id, arrival_s, tier, tbt_slo_s, prompt_len, output_len)

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
                samples = self._tbt[rec.tier]
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
        records, tbt = self.records, self._tbt
        for ev in events:
            rec = records[ev.req_id]
            last = rec.last_token_s
            if last is None:
                rec.first_token_s = t
            else:
                gap = t - last
                tbt[rec.tier].append(gap)
                if gap > rec.tbt_slo_s:
                    rec.num_tbt_violations += 1
                if gap > rec.max_tbt_s:
                    rec.max_tbt_s = gap
            rec.last_token_s = t
            rec.num_tokens += 1
            if ev.finish_reason is not None:
                rec.finish_reason = ev.finish_reason

    def on_event(self, ev: Any) -> None:
        """A core ``TokenEvent`` (duck-typed: req_id, token_ids, time_s, finish_reason)."""
        self.on_token(ev.req_id, ev.time_s, len(ev.token_ids), ev.finish_reason)

    def tbt_samples(self, tier: str | None = None) -> np.ndarray:
        if tier is not None:
            return np.frombuffer(self._tbt[tier], dtype=float) if len(self._tbt[tier]) else np.zeros(0)
        parts = [np.frombuffer(a, dtype=float) for a in self._tbt.values() if len(a)]
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
        for tier in self._tbt:
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
        out["num_preemptions"] = self.num_preemptions
        return out


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


@dataclass(frozen=True, slots=True)
class SloCriterion:
    """The capacity criterion: pooled median TTFT + per-tier P99 TBT (see simulator/capacity.py)."""

    ttft_p50_max_s: float = 0.5  # strict: median TTFT < this
    tbt_p99_max_paying_s: float = 0.1  # P99 TBT of paying <= this
    tbt_p99_max_free_s: float = 0.5

    def margins(self, s: dict[str, Any]) -> dict[str, float]:
        """Relative slack of each condition ((limit - value) / limit); negative = violated."""
        def rel(v: float | None, lim: float) -> float:
            return -math.inf if v is None else (lim - v) / lim
        tbt = s.get("tbt_p99_s_by_tier", {})
        m = {"ttft_p50": rel(s.get("ttft_p50_s"), self.ttft_p50_max_s)}
        if tbt.get("paying") is not None:
            m["tbt_p99_paying"] = rel(tbt["paying"], self.tbt_p99_max_paying_s)
        if tbt.get("free") is not None:
            m["tbt_p99_free"] = rel(tbt["free"], self.tbt_p99_max_free_s)
        return m

    def passes(self, s: dict[str, Any]) -> bool:
        if s.get("num_unfinished", 0):
            return False
        m = self.margins(s)
        return m["ttft_p50"] > 0 and all(v >= 0 for k, v in m.items() if k != "ttft_p50")

    def margin(self, s: dict[str, Any]) -> float:
        """The binding (smallest) margin; > 0 roughly means pass."""
        return min(self.margins(s).values())

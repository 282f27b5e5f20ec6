"""Per-token latency metrics as one custom collector: the hot path is a bisect and two additions.

NOTE: prometheus-client's ``Histogram.observe`` takes a lock per value (≈ 1.4 µs);
at 128 decodes per step that alone is ≈ 0.2 ms, 0.6% of a 30 ms step. Tokens are
recorded from the scheduler's event loop thread only, so plain lists suffice; a
concurrent scrape may see a sample's count before its sum, which is harmless.

Exposes, labelled by tier: ``slai_time_to_first_token_seconds`` and
``slai_inter_token_latency_seconds`` (histograms), ``slai_tbt_deadline_misses_total``,
``slai_tbt_slo_attainment`` (sliding window) and ``slai_tbt_slo_attainment_cumulative``.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque
from typing import Callable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from telemetry import names as N


class SloWindow:
    """Share of TBT samples within SLO over roughly the last ``window_s`` seconds.

    NOTE: nothing per token: it differences the cumulative (samples, hits) counts between the
    snapshot taken now and the newest snapshot at least ``window_s`` old. Snapshots are taken
    when read (each scrape), so the window spans window_s to window_s + one scrape interval.
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._snapshots: deque[tuple[float, int, int]] = deque([(clock(), 0, 0)])
        self._lock = threading.Lock()

    def attainment(self, samples: int, hits: int) -> float:
        """Given the cumulative counts now; 1.0 when the window has no samples (nothing missed)."""
        now = self._clock()
        with self._lock:
            snaps = self._snapshots
            snaps.append((now, samples, hits))
            horizon = now - self.window_s
            while len(snaps) > 1 and snaps[1][0] <= horizon:
                snaps.popleft()
            _, s0, h0 = snaps[0]
        n = samples - s0
        return (hits - h0) / n if n > 0 else 1.0


class _Hist:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: +Inf
        self.sum = 0.0

    def buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip((*self.bounds, float("inf")), list(self.counts)):
            acc += n
            out.append((floatToGoString(bound), acc))
        return out


class _Tier:
    __slots__ = ("ttft", "itl", "misses", "samples", "hits", "window")

    def __init__(self, ttft_bounds: tuple[float, ...], itl_bounds: tuple[float, ...], window: SloWindow) -> None:
        self.ttft = _Hist(ttft_bounds)
        self.itl = _Hist(itl_bounds)
        self.misses = 0
        self.samples = 0
        self.hits = 0
        self.window = window


class TokenLatencyCollector(Collector):
    """TTFT / TBT histograms and TBT SLO accounting per tier; register it in a service's registry."""

    def __init__(self, tiers: tuple[str, ...], ttft_buckets: tuple[float, ...], itl_buckets: tuple[float, ...],
                 window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._ttft_bounds, self._itl_bounds = tuple(ttft_buckets), tuple(itl_buckets)
        self.tiers: dict[str, _Tier] = {}
        for t in tiers:
            self.tier(t)

    def tier(self, label: str) -> _Tier:
        st = self.tiers.get(label)
        if st is None:
            st = self.tiers[label] = _Tier(self._ttft_bounds, self._itl_bounds, SloWindow(self.window_s, self._clock))
        return st

    def observe(self, label: str, ttft_s: float | None, tbt_s: float | None, tbt_slo_s: float) -> None:
        st = self.tiers.get(label) or self.tier(label)
        if ttft_s is not None:
            h = st.ttft
            h.counts[bisect_left(h.bounds, ttft_s)] += 1
            h.sum += ttft_s
        if tbt_s is not None:
            h = st.itl
            h.counts[bisect_left(h.bounds, tbt_s)] += 1
            h.sum += tbt_s
            st.samples += 1
            if tbt_s <= tbt_slo_s:
                st.hits += 1
            else:
                st.misses += 1

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(with_samples=True))

    def _families(self, with_samples: bool = False) -> tuple[Metric, ...]:
        ttft = HistogramMetricFamily(N.M_TIME_TO_FIRST_TOKEN, "Arrival at the scheduler to first output token.",
                                     labels=[N.L_TIER])
        itl = HistogramMetricFamily(N.M_INTER_TOKEN_LATENCY, "Gap between consecutive output tokens (TBT); its "
                                    "_count is the number of TBT samples.", labels=[N.L_TIER])
        misses = CounterMetricFamily(N.M_TBT_DEADLINE_MISSES, "TBT samples above the request's TBT SLO.",
                                     labels=[N.L_TIER])
        window = GaugeMetricFamily(N.M_TBT_SLO_ATTAINMENT, f"Share of TBT samples within SLO over the last "
                                   f"{self.window_s:g} s (1 with no samples).", labels=[N.L_TIER])
        cumulative = GaugeMetricFamily(N.M_TBT_SLO_ATTAINMENT_CUMULATIVE, "Share of TBT samples within SLO since "
                                       "start (1 with no samples).", labels=[N.L_TIER])
        if with_samples:
            for label, st in list(self.tiers.items()):
                ttft.add_metric([label], st.ttft.buckets(), st.ttft.sum)
                itl.add_metric([label], st.itl.buckets(), st.itl.sum)
                misses.add_metric([label], st.misses)
                samples, hits = st.samples, st.hits
                window.add_metric([label], st.window.attainment(samples, hits))
                cumulative.add_metric([label], hits / samples if samples else 1.0)
        return ttft, itl, misses, window, cumulative

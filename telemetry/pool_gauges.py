"""The pool's load under vLLM's gauge names, for the Gateway API Inference Extension's endpoint picker.

An endpoint picker (llm-d's, or the extension's reference one) scrapes each model server's
``/metrics`` and scores it by ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and
``vllm:kv_cache_usage_perc``. A pool (one scheduler and its executors) answers under those names,
summed over its executors (docs/observability.md, "Endpoint picker gauges").

The values are read when ``/metrics`` is scraped, not copied at each step, so they are as fresh as
the scrape: a pool that went idle reads 0 at once, with no step to refresh a gauge. The read runs on
the metrics server's thread while the scheduler's event loop changes the counts; each count is one
``len()`` or attribute read, so a scrape can straddle one update (it sees the state just before or
just after it), never a torn value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from telemetry import names as N


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """One pool's load: requests waiting (no KV: new or preempted), running (holding KV), KV blocks."""

    num_waiting: int = 0
    num_running: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0

    @property
    def kv_usage(self) -> float:
        """Used share of the pool's KV blocks, in [0, 1] (0 while no executor is ready)."""
        if self.kv_total_blocks <= 0:
            return 0.0
        return min(1.0, max(0.0, self.kv_used_blocks / self.kv_total_blocks))


class PoolGauges(Collector):
    """Renders ``read()`` (a :class:`PoolLoad`) as the three vLLM gauges at every scrape; zeros until
    :meth:`watch` gives it a reader."""

    def __init__(self) -> None:
        self._read: Callable[[], PoolLoad] = PoolLoad

    def watch(self, read: Callable[[], PoolLoad]) -> None:
        """Read the pool's load with ``read`` from now on (it runs on the scraping thread)."""
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        load = self._read()
        yield GaugeMetricFamily(N.M_VLLM_NUM_REQUESTS_WAITING, "Requests waiting for KV in this pool (new or "
                                "preempted), all executors.", value=max(0, load.num_waiting))
        yield GaugeMetricFamily(N.M_VLLM_NUM_REQUESTS_RUNNING, "Requests holding KV in this pool, all executors.",
                                value=max(0, load.num_running))
        yield GaugeMetricFamily(N.M_VLLM_KV_CACHE_USAGE, "Used share of this pool's KV blocks, in [0, 1].",
                                value=load.kv_usage)


__all__ = ["PoolGauges", "PoolLoad"]

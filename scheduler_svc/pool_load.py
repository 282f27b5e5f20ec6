"""The pool's load (all executors of this scheduler together), for the endpoint picker's gauges.

``telemetry.pool_gauges`` renders it as ``vllm:num_requests_waiting`` / ``vllm:num_requests_running`` /
``vllm:kv_cache_usage_perc`` when ``/metrics`` is scraped (docs/observability.md, "Endpoint picker gauges").
"""

from __future__ import annotations

from scheduler_svc.dispatcher import Dispatcher
from telemetry.pool_gauges import PoolLoad


def pool_load(dispatcher: Dispatcher) -> PoolLoad:
    """Requests waiting and running, and KV blocks used of all, over the executors that are up now.

    Runs on the metrics server's thread: it only reads (a driver's ``core`` is read once, since a
    lost executor's driver drops it), and an executor that is down counts neither load nor blocks.
    """
    waiting = running = used = total = 0
    for driver in dispatcher.drivers:
        core = driver.core
        if core is None:
            continue
        n_running = len(core.running)
        running += n_running
        waiting += max(0, len(core.requests) - n_running)
        used += core.allocator.num_used_blocks
        total += core.allocator.num_blocks
    return PoolLoad(num_waiting=waiting, num_running=running, kv_used_blocks=used, kv_total_blocks=total)

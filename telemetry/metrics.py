"""Prometheus metrics (vLLM's names under ``slai_``; names in ``telemetry.names``), one registry per service.

Each service builds its own object, so three services in one test process never
clash on prometheus-client's global registry::

    metrics = SchedulerMetrics()                       # its own CollectorRegistry
    start_metrics_server(metrics_port(SCHEDULER_METRICS_PORT), metrics.registry)

Recording is a few label-child lookups (cached) and ``observe``/``inc`` calls:
≈ 1-3 µs per token event and ≈ 10 µs per step (``benchmarks/telemetry_overhead.py``).
SLO attainment is computed at scrape time, so the per-token path only counts.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from telemetry import names as N
from telemetry.pool_gauges import PoolGauges, PoolLoad
from telemetry.token_metrics import SloWindow, TokenLatencyCollector
from telemetry.tracing import tier_label

TIERS = ("paying", "free")
# NOTE: vLLM's TTFT/ITL/E2E buckets, trimmed; ITL gets extra resolution around the 0.1 s / 0.5 s TBT SLOs.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0,
               2.5, 5.0, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                1.0, 2.5)
DECODES_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _child_cache(metric: Any) -> Callable[..., Any]:
    cache: dict[tuple, Any] = {}

    def child(*labels: str) -> Any:
        c = cache.get(labels)
        if c is None:
            c = cache[labels] = metric.labels(*labels)
        return c
    return child


class SchedulerMetrics:
    """Request latencies per tier, SLO accounting, and per-executor step metrics (the scheduler's /metrics)."""

    def __init__(self, registry: CollectorRegistry | None = None, window_s: float = 60.0) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        tier, ex = [N.L_TIER], [N.L_EXECUTOR]
        self.tokens = TokenLatencyCollector(TIERS, TTFT_BUCKETS, ITL_BUCKETS, window_s)  # TTFT, ITL, SLO
        r.register(self.tokens)
        self.e2e = Histogram(N.M_E2E_REQUEST_LATENCY, "Arrival to last token.", tier, registry=r,
                             buckets=E2E_BUCKETS)
        self.queue = Histogram(N.M_REQUEST_QUEUE_TIME, "Arrival to first scheduled.", tier, registry=r,
                               buckets=TTFT_BUCKETS)
        self.prompt_tokens = Counter(N.M_PROMPT_TOKENS, "Prompt tokens of finished requests.", tier, registry=r)
        self.generation_tokens = Counter(N.M_GENERATION_TOKENS, "Output tokens of finished requests.", tier,
                                         registry=r)
        self.request_success = Counter(N.M_REQUEST_SUCCESS, "Finished requests.", [N.L_TIER, N.L_FINISH_REASON],
                                       registry=r)
        self.running = Gauge(N.M_NUM_REQUESTS_RUNNING, "Requests holding KV.", ex, registry=r)
        self.waiting = Gauge(N.M_NUM_REQUESTS_WAITING, "Requests waiting (new or preempted).", ex, registry=r)
        self.kv_usage = Gauge(N.M_KV_CACHE_USAGE, "KV blocks in use, fraction in [0, 1].", ex, registry=r)
        self.preemptions = Counter(N.M_NUM_PREEMPTIONS, "Recompute preemptions.", ex, registry=r)
        self.steps = Counter(N.M_STEPS, "Non-empty steps.", ex, registry=r)
        self.critical = Counter(N.M_CRITICAL_DECODES, "SLAI decodes past their last schedulable time.", ex,
                                registry=r)
        self.noncritical = Counter(N.M_NONCRITICAL_DECODES, "Decodes that were not critical.", ex, registry=r)
        self.prefill_tokens = Counter(N.M_PREFILL_TOKENS_SCHEDULED, "Prompt tokens in prefill chunks.", ex,
                                      registry=r)
        self.step_decodes = Histogram(N.M_STEP_NUM_DECODES, "Decodes per step by kind.", [N.L_EXECUTOR, N.L_KIND],
                                      registry=r, buckets=DECODES_BUCKETS)
        self.offset = Gauge(N.M_SLAI_OFFSET, "SLAI's offset (delta) in force.", ex, registry=r)
        self.batch_time = Gauge(N.M_BATCH_TIME_ESTIMATE, "The core's running mean batch time.", ex, registry=r)
        self.step_time = Histogram(N.M_STEP_DURATION, "Plan sent to result received.", ex, registry=r,
                                   buckets=STEP_BUCKETS)
        self.forward_time = Histogram(N.M_BATCH_FORWARD_DURATION, "Model forward pass (executor's forward_ns).", ex,
                                      registry=r, buckets=STEP_BUCKETS)
        # the endpoint picker's gauges (vLLM names), read from the pool at scrape time: see watch_pool
        self.pool = PoolGauges()
        r.register(self.pool)
        self.cache_queries = Counter(N.M_PREFIX_CACHE_QUERIES, "Prefix cache queries, in prompt tokens admitted.",
                                     ex, registry=r)
        self.cache_hits = Counter(N.M_PREFIX_CACHE_HITS, "Prefix cache hits, in prompt tokens found cached.", ex,
                                  registry=r)

        self._e2e, self._queue = _child_cache(self.e2e), _child_cache(self.queue)
        self._labels: dict[Any, str] = {}
        self._ex: dict[str, tuple] = {}

    def _tier(self, tier: Any) -> str:
        label = self._labels.get(tier)
        if label is None:
            label = self._labels[tier] = tier_label(tier)
        return label

    def watch_pool(self, read: Callable[[], PoolLoad]) -> None:
        """Export ``read()``, the whole pool's load, as ``vllm:num_requests_waiting`` / ``_running`` /
        ``vllm:kv_cache_usage_perc`` (read at each scrape, on the scraping thread)."""
        self.pool.watch(read)

    # ------------------------------------------------------------------ per token (from TokenEvents)
    def record_token_event(self, tier: Any, ttft_s: float | None, tbt_s: float | None, tbt_slo_s: float) -> None:
        """One output token: its TTFT (first token) or TBT gap (later tokens) against the request's SLO.

        ``tier``: a core ``Tier`` or "paying"/"free". The TBT sample count is the ITL histogram's _count.
        """
        label = self._labels.get(tier) or self._tier(tier)
        self.tokens.observe(label, ttft_s, tbt_s, tbt_slo_s)

    def record_finish(self, tier: Any, e2e_s: float, queue_s: float | None, *, prompt_tokens: int = 0,
                      completion_tokens: int = 0, finish_reason: str = "length") -> None:
        """A finished request (where the final TokenEvent with usage and timings is built)."""
        t = self._tier(tier)
        self._e2e(t).observe(e2e_s)
        if queue_s is not None:
            self._queue(t).observe(queue_s)
        if prompt_tokens:
            self.prompt_tokens.labels(t).inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.labels(t).inc(completion_tokens)
        self.request_success.labels(t, finish_reason or "unknown").inc()

    # ------------------------------------------------------------------ per step
    def _executor(self, executor: str) -> tuple:
        ch = self._ex.get(executor)
        if ch is None:
            e = executor
            ch = self._ex[e] = (
                self.running.labels(e), self.waiting.labels(e), self.kv_usage.labels(e), self.preemptions.labels(e),
                self.steps.labels(e), self.critical.labels(e), self.noncritical.labels(e),
                self.prefill_tokens.labels(e), self.step_decodes.labels(e, "critical"),
                self.step_decodes.labels(e, "noncritical"), self.offset.labels(e), self.batch_time.labels(e),
                self.step_time.labels(e), self.forward_time.labels(e), self.cache_queries.labels(e),
                self.cache_hits.labels(e))
        return ch

    def record_step(self, executor: str, plan_stats: Any, step_s: float | None = None, forward_ns: int | None = None,
                    mean_batch_s: float | None = None) -> None:
        """One step of one executor: queue gauges and SLAI's decisions from ``plan.stats`` (a PlanStats);
        ``step_s`` the round trip, ``forward_ns`` from the result, ``mean_batch_s`` = ``core.mean_batch_s``.
        Call it for empty plans too (with ``step_s=None``) to keep the gauges fresh."""
        (running, waiting, kv, preempt, steps, crit, noncrit, prefill, h_crit, h_noncrit, offset, batch_time,
         step_time, forward_time, cache_queries, cache_hits) = self._executor(executor)
        s = plan_stats
        running.set(s.num_running)
        waiting.set(s.num_waiting)
        kv.set(s.kv_used_fraction)
        offset.set(s.offset)
        if s.num_preempted:
            preempt.inc(s.num_preempted)
        if mean_batch_s is not None:
            batch_time.set(mean_batch_s)
        if step_s is None:
            return
        steps.inc()
        if s.prefix_cache_queries:
            cache_queries.inc(s.prefix_cache_queries)
            cache_hits.inc(s.prefix_cache_hits)
        crit.inc(s.num_critical_decodes)
        noncrit.inc(s.num_noncritical_decodes)
        prefill.inc(s.num_prefill_tokens)
        h_crit.observe(s.num_critical_decodes)
        h_noncrit.observe(s.num_noncritical_decodes)
        step_time.observe(step_s)
        if forward_ns is not None:
            forward_time.observe(forward_ns * 1e-9)


class ExecutorMetrics:
    """The executor's own view of each step, split by phase (TGI's tgi_batch_inference_duration).

    ``idle`` is the wait for the plan since the previous step ended: under load, the scheduling gap that
    planning ahead hides (when the system is empty it also holds the empty time)."""

    PHASES = ("prepare", "forward", "sample", "total", "idle")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.inference = Histogram(N.M_BATCH_INFERENCE_DURATION, "Executor step time by phase.", [N.L_PHASE],
                                   registry=r, buckets=STEP_BUCKETS)
        self.batch_size = Histogram(N.M_EXECUTOR_BATCH_SIZE, "Sequences per step.", registry=r,
                                    buckets=DECODES_BUCKETS)
        self._phases = [(f"{p}_ns", self.inference.labels(p)) for p in self.PHASES]

    def record_step(self, result: Any, num_seqs: int | None = None) -> None:
        """``result``: a StepResponse or core StepResult (prepare/forward/sample/total/idle ns)."""
        for field, child in self._phases:
            child.observe(getattr(result, field) * 1e-9)
        if num_seqs is not None:
            self.batch_size.observe(num_seqs)


class GatewayMetrics:
    """Requests by tier and outcome, and requests in flight (the gateway's /metrics)."""

    OUTCOMES = ("ok", "rejected", "error", "cancelled")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(N.M_GATEWAY_REQUESTS, "Requests by tier and outcome.", [N.L_TIER, N.L_OUTCOME],
                                registry=r)
        self.in_flight = Gauge(N.M_GATEWAY_IN_FLIGHT, "Requests being served.", registry=r)

    def record_request(self, tier: Any, outcome: str = "ok") -> None:
        """Count one request when it ends (``outcome`` in OUTCOMES)."""
        self.requests.labels(tier_label(tier), outcome).inc()


# the serving helpers live in metrics_http (re-exported here for one import)
from telemetry.metrics_http import add_metrics_route, metrics_port, render, start_metrics_server  # noqa: E402

__all__ = ["ExecutorMetrics", "GatewayMetrics", "PoolLoad", "SchedulerMetrics", "SloWindow", "add_metrics_route",
           "metrics_port", "render", "start_metrics_server"]

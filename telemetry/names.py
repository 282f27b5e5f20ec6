"""Every span name, attribute key, event name, metric name and telemetry port in one place.

Request attributes reuse the GenAI names that vLLM and SGLang already emit
(``gen_ai.*``), so dashboards and trace queries written for them work here.
Project attributes use an ``slai.`` prefix. Prometheus metrics follow vLLM's
names under an ``slai_`` prefix. Stdlib only: safe to import anywhere.
"""

from __future__ import annotations

# ---------------------------------------------------------------- services (default OTEL_SERVICE_NAME)
SERVICE_GATEWAY = "slai-gateway"
SERVICE_SCHEDULER = "slai-scheduler"
SERVICE_EXECUTOR = "slai-executor"

# ---------------------------------------------------------------- span names
SPAN_GATEWAY_REQUEST = "gateway.generate"  # one per client request, the trace root
SPAN_SCHEDULER_REQUEST = "scheduler.request"  # one per Submit stream, child of the gateway span
SPAN_SCHEDULER_STEP = "scheduler.step"  # one per step: its own trace, LINKED to its requests' spans
SPAN_EXECUTOR_STEP = "executor.step"  # one per step, child of scheduler.step via StepRequest.traceparent

# span events on scheduler.request (from the core's LifecycleEvents)
EVENT_QUEUED = "queued"
EVENT_SCHEDULED = "scheduled"
EVENT_PREEMPTED = "preempted"
EVENT_FIRST_TOKEN = "first_token"
EVENT_FINISHED = "finished"
# on gateway.generate
EVENT_GATEWAY_FIRST_CHUNK = "first_chunk"
EVENT_REJECTED = "rejected"

# ---------------------------------------------------------------- GenAI request attributes (vLLM vllm/tracing.py)
GEN_AI_REQUEST_ID = "gen_ai.request.id"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
GEN_AI_USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
GEN_AI_LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
GEN_AI_LATENCY_E2E = "gen_ai.latency.e2e"
GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL = "gen_ai.latency.time_in_model_prefill"
GEN_AI_LATENCY_TIME_IN_MODEL_DECODE = "gen_ai.latency.time_in_model_decode"

# ---------------------------------------------------------------- project request attributes
SLAI_TIER = "slai.tier"  # "paying" | "free"
SLAI_TBT_SLO_S = "slai.tbt_slo_s"
SLAI_TTFT_SLO_S = "slai.ttft_slo_s"
SLAI_NUM_PREEMPTIONS = "slai.num_preemptions"
SLAI_MAX_TBT_S = "slai.max_tbt_s"
SLAI_EXECUTOR = "slai.executor"  # executor address or name
SLAI_FINISH_REASON = "slai.finish_reason"  # on the "finished" event

# ---------------------------------------------------------------- step attributes (scheduler.step, executor.step)
SLAI_STEP_ID = "slai.step.id"
SLAI_STEP_NUM_SEQS = "slai.step.num_seqs"
SLAI_STEP_NUM_PREFILL_TOKENS = "slai.step.num_prefill_tokens"
SLAI_STEP_NUM_DECODES = "slai.step.num_decodes"
SLAI_STEP_NUM_CRITICAL_DECODES = "slai.step.num_critical_decodes"
SLAI_STEP_NUM_NONCRITICAL_DECODES = "slai.step.num_noncritical_decodes"
SLAI_STEP_NUM_PREEMPTED = "slai.step.num_preempted"
SLAI_STEP_KV_USED_FRACTION = "slai.step.kv_used_fraction"
SLAI_STEP_OFFSET = "slai.step.offset"
SLAI_STEP_NUM_WAITING = "slai.step.num_waiting"
SLAI_STEP_NUM_RUNNING = "slai.step.num_running"
SLAI_STEP_NUM_LINKS_DROPPED = "slai.step.num_links_dropped"  # requests beyond MAX_STEP_LINKS
SLAI_STEP_PREPARE_NS = "slai.step.prepare_ns"
SLAI_STEP_FORWARD_NS = "slai.step.forward_ns"
SLAI_STEP_SAMPLE_NS = "slai.step.sample_ns"
SLAI_STEP_TOTAL_NS = "slai.step.total_ns"
SLAI_STEP_IDLE_NS = "slai.step.idle_ns"  # the executor's wait for this plan since its previous step ended
SLAI_STEP_NUM_SAMPLED = "slai.step.num_sampled"
SLAI_STEP_PREFIX_CACHE_QUERIES = "slai.step.prefix_cache_queries"
SLAI_STEP_PREFIX_CACHE_HITS = "slai.step.prefix_cache_hits"

# PlanStats field -> step attribute (the order PlanStats declares them)
PLAN_STATS_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("num_prefill_tokens", SLAI_STEP_NUM_PREFILL_TOKENS),
    ("num_decodes", SLAI_STEP_NUM_DECODES),
    ("num_critical_decodes", SLAI_STEP_NUM_CRITICAL_DECODES),
    ("num_noncritical_decodes", SLAI_STEP_NUM_NONCRITICAL_DECODES),
    ("num_preempted", SLAI_STEP_NUM_PREEMPTED),
    ("kv_used_fraction", SLAI_STEP_KV_USED_FRACTION),
    ("offset", SLAI_STEP_OFFSET),
    ("num_waiting", SLAI_STEP_NUM_WAITING),
    ("num_running", SLAI_STEP_NUM_RUNNING),
    ("prefix_cache_queries", SLAI_STEP_PREFIX_CACHE_QUERIES),
    ("prefix_cache_hits", SLAI_STEP_PREFIX_CACHE_HITS),
)
# StepResult / StepResponse field -> step attribute
STEP_RESULT_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("prepare_ns", SLAI_STEP_PREPARE_NS),
    ("forward_ns", SLAI_STEP_FORWARD_NS),
    ("sample_ns", SLAI_STEP_SAMPLE_NS),
    ("total_ns", SLAI_STEP_TOTAL_NS),
    ("idle_ns", SLAI_STEP_IDLE_NS),
)

# NOTE: 128 is the SDK's default OTEL_SPAN_LINK_COUNT_LIMIT; more links would be dropped silently.
MAX_STEP_LINKS = 128
# Step-tracing knobs (project env vars; the OTel SDK has no per-span-kind sampling):
# OTLP-encoding a step span costs ≈ 9 µs per link in the exporter thread (docs/observability.md).
TRACE_STEP_EVERY_ENV = "SLAI_TRACE_STEP_EVERY"  # trace one step in N (default 1: every step)
TRACE_STEP_LINKS_ENV = "SLAI_TRACE_STEP_LINKS"  # links per step span (default and maximum: MAX_STEP_LINKS)

# ---------------------------------------------------------------- W3C trace context
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

# ---------------------------------------------------------------- Prometheus metrics (prometheus-client adds
# _bucket/_sum/_count to histograms and _total to counters)
METRIC_PREFIX = "slai_"
# request latencies, labelled by tier (recorded by the scheduler, on its clock)
M_TIME_TO_FIRST_TOKEN = "slai_time_to_first_token_seconds"
M_INTER_TOKEN_LATENCY = "slai_inter_token_latency_seconds"
M_E2E_REQUEST_LATENCY = "slai_e2e_request_latency_seconds"
M_REQUEST_QUEUE_TIME = "slai_request_queue_time_seconds"
M_PROMPT_TOKENS = "slai_prompt_tokens"  # counter -> slai_prompt_tokens_total{tier}
M_GENERATION_TOKENS = "slai_generation_tokens"  # counter -> slai_generation_tokens_total{tier}
M_REQUEST_SUCCESS = "slai_request_success"  # counter -> slai_request_success_total{tier,finish_reason}
# SLO accounting (no incumbent exports these)
# TBT samples per tier = slai_inter_token_latency_seconds_count{tier}
M_TBT_DEADLINE_MISSES = "slai_tbt_deadline_misses"  # counter -> slai_tbt_deadline_misses_total{tier}
M_TBT_SLO_ATTAINMENT = "slai_tbt_slo_attainment"  # gauge{tier}: share of TBT samples <= SLO, sliding window
M_TBT_SLO_ATTAINMENT_CUMULATIVE = "slai_tbt_slo_attainment_cumulative"  # gauge{tier}: since start
# per executor (scheduler side)
M_NUM_REQUESTS_RUNNING = "slai_num_requests_running"
M_NUM_REQUESTS_WAITING = "slai_num_requests_waiting"
M_KV_CACHE_USAGE = "slai_kv_cache_usage_perc"  # NOTE: a fraction in [0, 1], as vLLM's kv_cache_usage_perc
M_NUM_PREEMPTIONS = "slai_num_preemptions"  # counter -> slai_num_preemptions_total{executor}
M_STEPS = "slai_steps"  # counter -> slai_steps_total{executor}
M_CRITICAL_DECODES = "slai_critical_decodes"  # counter -> slai_critical_decodes_total{executor}
M_NONCRITICAL_DECODES = "slai_noncritical_decodes"  # counter -> slai_noncritical_decodes_total{executor}
M_PREFILL_TOKENS_SCHEDULED = "slai_prefill_tokens_scheduled"  # counter -> ..._total{executor}
M_STEP_NUM_DECODES = "slai_step_num_decodes"  # histogram{executor,kind=critical|noncritical}
M_SLAI_OFFSET = "slai_offset"  # gauge{executor}: SLAI's delta in force
M_BATCH_TIME_ESTIMATE = "slai_batch_time_estimate_seconds"  # gauge{executor}: the core's mean batch time
M_STEP_DURATION = "slai_step_duration_seconds"  # histogram{executor}: plan sent -> result received
M_BATCH_FORWARD_DURATION = "slai_batch_forward_duration_seconds"  # histogram{executor}: forward_ns
# prefix caching, vLLM's vllm:prefix_cache_queries / vllm:prefix_cache_hits (tokens): hit rate = hits / queries
M_PREFIX_CACHE_QUERIES = "slai_prefix_cache_queries"  # counter -> ..._total{executor}: prompt tokens looked up
M_PREFIX_CACHE_HITS = "slai_prefix_cache_hits"  # counter -> ..._total{executor}: of those, found cached
# executor side (TGI's tgi_batch_inference_duration split by phase)
M_BATCH_INFERENCE_DURATION = "slai_batch_inference_duration_seconds"  # histogram{phase}
M_EXECUTOR_BATCH_SIZE = "slai_executor_batch_size"  # histogram: sequences per step
# per pool (the scheduler's /metrics, all its executors together), under the names the Gateway API
# Inference Extension's endpoint picker reads from vLLM (docs/observability.md, "Endpoint picker gauges")
M_VLLM_NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
M_VLLM_NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
M_VLLM_KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"  # NOTE: a fraction in [0, 1], as vLLM's
# gateway side
M_GATEWAY_REQUESTS = "slai_gateway_requests"  # counter -> slai_gateway_requests_total{tier,outcome}
M_GATEWAY_IN_FLIGHT = "slai_gateway_in_flight_requests"  # gauge

# label names
L_TIER = "tier"
L_EXECUTOR = "executor"
L_PHASE = "phase"
L_KIND = "kind"
L_OUTCOME = "outcome"
L_FINISH_REASON = "finish_reason"

# ---------------------------------------------------------------- /metrics ports (compose, deploy/prometheus.yml)
METRICS_PORT_ENV = "SLAI_METRICS_PORT"  # overrides the defaults below; -1 = do not serve
GATEWAY_HTTP_PORT = 8000  # the gateway serves /metrics on its HTTP port
SCHEDULER_METRICS_PORT = 9101
EXECUTOR_METRICS_PORT = 9102
METRICS_PATH = "/metrics"

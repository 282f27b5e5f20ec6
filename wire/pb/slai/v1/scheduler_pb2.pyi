from wire.pb.slai.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GatewayMessage(_message.Message):
    __slots__ = ("submit", "abort")
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    submit: SessionSubmit
    abort: AbortRequest
    def __init__(self, submit: _Optional[_Union[SessionSubmit, _Mapping]] = ..., abort: _Optional[_Union[AbortRequest, _Mapping]] = ...) -> None: ...

class SessionSubmit(_message.Message):
    __slots__ = ("request", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request: SubmitRequest
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, request: _Optional[_Union[SubmitRequest, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SchedulerMessage(_message.Message):
    __slots__ = ("events", "errors", "load")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[TokenEvent]
    errors: _containers.RepeatedCompositeFieldContainer[RequestError]
    load: PoolLoad
    def __init__(self, events: _Optional[_Iterable[_Union[TokenEvent, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[RequestError, _Mapping]]] = ..., load: _Optional[_Union[PoolLoad, _Mapping]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("request_id", "code", "message", "retry_after_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    retry_after_s: float
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class PoolLoad(_message.Message):
    __slots__ = ("outstanding_tokens", "num_requests", "num_healthy_executors", "num_queued")
    OUTSTANDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEALTHY_EXECUTORS_FIELD_NUMBER: _ClassVar[int]
    NUM_QUEUED_FIELD_NUMBER: _ClassVar[int]
    outstanding_tokens: int
    num_requests: int
    num_healthy_executors: int
    num_queued: int
    def __init__(self, outstanding_tokens: _Optional[int] = ..., num_requests: _Optional[int] = ..., num_healthy_executors: _Optional[int] = ..., num_queued: _Optional[int] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "max_tokens", "sampling", "tier", "tbt_slo_s", "ttft_slo_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TBT_SLO_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_SLO_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    sampling: _common_pb2.SamplingParams
    tier: _common_pb2.Tier
    tbt_slo_s: float
    ttft_slo_s: float
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., tbt_slo_s: _Optional[float] = ..., ttft_slo_s: _Optional[float] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("request_id", "token_ids", "finish_reason", "usage", "timings", "time_s", "ttft_s", "tbt_s", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TIME_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TBT_S_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    timings: _common_pb2.RequestTimings
    time_s: float
    ttft_s: float
    tbt_s: float
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.Logprobs]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.RequestTimings, _Mapping]] = ..., time_s: _Optional[float] = ..., ttft_s: _Optional[float] = ..., tbt_s: _Optional[float] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.Logprobs, _Mapping]]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExecutorStats(_message.Message):
    __slots__ = ("address", "healthy", "num_waiting", "num_running", "num_blocks", "kv_used_fraction", "mean_batch_s", "num_steps", "num_preemptions", "last_num_critical_decodes", "last_num_noncritical_decodes", "last_num_prefill_tokens", "last_offset", "mean_decision_s", "mean_executor_wait_s", "mean_rpc_overhead_s", "num_steps_planned_ahead", "prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_rate", "mean_plan_ahead_lead_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_S_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_NUM_CRITICAL_DECODES_FIELD_NUMBER: _ClassVar[int]
    LAST_NUM_NONCRITICAL_DECODES_FIELD_NUMBER: _ClassVar[int]
    LAST_NUM_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    MEAN_DECISION_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_EXECUTOR_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_RPC_OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_PLANNED_AHEAD_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_PLAN_AHEAD_LEAD_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    healthy: bool
    num_waiting: int
    num_running: int
    num_blocks: int
    kv_used_fraction: float
    mean_batch_s: float
    num_steps: int
    num_preemptions: int
    last_num_critical_decodes: int
    last_num_noncritical_decodes: int
    last_num_prefill_tokens: int
    last_offset: float
    mean_decision_s: float
    mean_executor_wait_s: float
    mean_rpc_overhead_s: float
    num_steps_planned_ahead: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    mean_plan_ahead_lead_s: float
    def __init__(self, address: _Optional[str] = ..., healthy: _Optional[bool] = ..., num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., num_blocks: _Optional[int] = ..., kv_used_fraction: _Optional[float] = ..., mean_batch_s: _Optional[float] = ..., num_steps: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., last_num_critical_decodes: _Optional[int] = ..., last_num_noncritical_decodes: _Optional[int] = ..., last_num_prefill_tokens: _Optional[int] = ..., last_offset: _Optional[float] = ..., mean_decision_s: _Optional[float] = ..., mean_executor_wait_s: _Optional[float] = ..., mean_rpc_overhead_s: _Optional[float] = ..., num_steps_planned_ahead: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., mean_plan_ahead_lead_s: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("policy", "executors", "num_queued_total", "num_queued_prompt_tokens", "num_tbt_samples", "tbt_p50_s", "tbt_p99_s")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EXECUTORS_FIELD_NUMBER: _ClassVar[int]
    NUM_QUEUED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_QUEUED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_TBT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TBT_P50_S_FIELD_NUMBER: _ClassVar[int]
    TBT_P99_S_FIELD_NUMBER: _ClassVar[int]
    policy: str
    executors: _containers.RepeatedCompositeFieldContainer[ExecutorStats]
    num_queued_total: int
    num_queued_prompt_tokens: int
    num_tbt_samples: int
    tbt_p50_s: float
    tbt_p99_s: float
    def __init__(self, policy: _Optional[str] = ..., executors: _Optional[_Iterable[_Union[ExecutorStats, _Mapping]]] = ..., num_queued_total: _Optional[int] = ..., num_queued_prompt_tokens: _Optional[int] = ..., num_tbt_samples: _Optional[int] = ..., tbt_p50_s: _Optional[float] = ..., tbt_p99_s: _Optional[float] = ...) -> None: ...

"""The gateway's side of the gateway <-> scheduler boundary: one channel, its calls, and (with
``gateway/scheduler_session.py``, the multiplexed Session stream) the only place the gateway reads or
builds scheduler protobuf (``SubmitRequest`` out, ``TokenEvent`` in).

The scheduler's side of the same messages is ``scheduler_svc/submit_codec.py``.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import codec
from gateway.config import GatewayConfig, TierPolicy
from gateway.scheduler_errors import is_final, scheduler_error  # noqa: F401 - re-exported
from gateway.scheduler_session import SchedulerSession
from gateway.types import GenerationInput, Timings
from wire import enums
from wire.grpc_server import keepalive_client_options, message_size_options
from wire.logprobs_codec import logprobs_from_pb
from wire.pb.slai.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from wire.service_auth import call_metadata

log = logging.getLogger(__name__)

# NOTE: wait_for_ready=False makes an RPC fail at once while the channel is in
# TRANSIENT_FAILURE; these bound how long a connection attempt to a silent host
# can take (the default connect timeout is 20 s) and how soon a restarted
# scheduler is picked up again.
SCHEDULER_CHANNEL_OPTIONS = (
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    *message_size_options(),
    # a pool whose host vanishes must break its Session stream so its requests fail over (gateway/pools.py)
    *keepalive_client_options(),
)


def submit_request(request_id: str, prompt_ids: list[int], max_tokens: int, inp: GenerationInput,
                   tier: TierPolicy, eos_token_ids) -> scheduler_pb2.SubmitRequest:
    """The ``SubmitRequest`` for a validated, tokenized input; the tier's objectives ride along.

    Stop tokens: the model's EOS ids plus the client's ``stop_token_ids``; with ``ignore_eos`` only the
    client's (vLLM's meaning: ignore_eos never ignores stop_token_ids).
    """
    stops, ignore_eos = tuple(eos_token_ids), inp.ignore_eos
    if inp.stop_token_ids:
        user = tuple(dict.fromkeys(inp.stop_token_ids))
        stops, ignore_eos = (user, False) if ignore_eos else (tuple(dict.fromkeys(stops + user)), False)
    sampling = common_pb2.SamplingParams(
        temperature=inp.temperature, top_p=inp.top_p, top_k=inp.top_k,
        stop_token_ids=stops, ignore_eos=ignore_eos,
        presence_penalty=inp.presence_penalty, frequency_penalty=inp.frequency_penalty,
        repetition_penalty=inp.repetition_penalty, min_tokens=inp.min_tokens)
    for tok, bias in inp.logit_bias:
        sampling.logit_bias[tok] = bias
    if inp.seed is not None:
        sampling.seed = inp.seed
    if inp.logprobs is not None:
        sampling.logprobs = inp.logprobs
    if inp.prompt_logprobs is not None:
        sampling.prompt_logprobs = inp.prompt_logprobs
    return scheduler_pb2.SubmitRequest(
        request_id=request_id, prompt_token_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling,
        tier=enums.TIER_TO_PB[tier.tier], tbt_slo_s=tier.tbt_slo_s, ttft_slo_s=tier.ttft_slo_s)


def sub_request(msg: scheduler_pb2.SubmitRequest, index: int) -> scheduler_pb2.SubmitRequest:
    """Completion ``index`` of an ``n > 1`` request: id ``<request_id>-<index>``, and its own seed stream
    (the request's seed + index; unseeded stays unseeded, so each draws independently)."""
    sub = scheduler_pb2.SubmitRequest()
    sub.CopyFrom(msg)
    sub.request_id = f"{msg.request_id}-{index}"
    if msg.sampling.HasField("seed"):
        sub.sampling.seed = (msg.sampling.seed + index) % 2**64
    return sub


def event_logprobs(ev: scheduler_pb2.TokenEvent) -> tuple | None:
    """An event's logprobs (``contract.logprobs.SampleLogprobs`` or None per token id), None if it has none."""
    return logprobs_from_pb(ev.logprobs) if ev.logprobs else None


class TimingTracker:
    """Rebuilds a request's timings from its token events (used when the gateway stops it early)."""

    def __init__(self) -> None:
        self.arrival_s: float | None = None
        self.last_s = 0.0
        self.ttft_s = 0.0
        self.max_tbt_s = 0.0

    def on_event(self, ev: scheduler_pb2.TokenEvent) -> None:
        if ev.ttft_s > 0 and self.arrival_s is None:
            self.ttft_s = ev.ttft_s
            self.arrival_s = ev.time_s - ev.ttft_s
        self.max_tbt_s = max(self.max_tbt_s, ev.tbt_s)
        if ev.time_s > 0:
            self.last_s = ev.time_s

    def timings(self) -> Timings:
        e2e = self.last_s - self.arrival_s if self.arrival_s is not None else 0.0
        return Timings(ttft_s=self.ttft_s, e2e_s=max(e2e, 0.0), max_tbt_s=self.max_tbt_s)

    def final(self, ev: scheduler_pb2.TokenEvent) -> tuple[str, int | None, Timings]:
        """``(finish reason, completion tokens or None, timings)`` of a final event; the tracker's own
        timings where the event carries none."""
        timings = codec.timings_from_pb(ev.timings) if ev.HasField("timings") else self.timings()
        if timings.ttft_s == 0 and timings.e2e_s == 0:
            timings = self.timings()
        completion = ev.usage.completion_tokens if ev.HasField("usage") else None
        return enums.FINISH_FROM_PB[ev.finish_reason], completion, timings


class SchedulerClient:
    """The gateway's channel to its scheduler. Every call carries the service token."""

    def __init__(self, config: GatewayConfig, channel: grpc.aio.Channel | None = None,
                 address: str | None = None) -> None:
        self.address = address or config.scheduler_address
        self._channel = channel or grpc.aio.insecure_channel(self.address, options=SCHEDULER_CHANNEL_OPTIONS)
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        self._token = config.service_token
        self._auth = call_metadata(config.service_token)  # proves to the scheduler that this is the gateway
        self.session = SchedulerSession(self._stub, self.address, self._auth)

    async def close(self) -> None:
        await self.session.close()
        await self._channel.close()

    def state(self) -> str:
        """The channel's connectivity state (``READY``, ``TRANSIENT_FAILURE``, ...)."""
        return self._channel.get_state(try_to_connect=True).name

    def submit(self, msg: scheduler_pb2.SubmitRequest, sink, trace_metadata=()):
        """Start a request on this gateway's Session stream; its ``TokenEvent`` messages (then the
        exception that ends it, if any) go to ``sink`` (``gateway.scheduler_session.SessionCall``).
        Cancelling the returned call aborts the request."""
        return self.session.submit(msg, sink, trace_metadata)

    async def abort(self, request_id: str) -> bool:
        """Abort a request at the scheduler; True if it was running there."""
        try:
            resp = await self._stub.Abort(scheduler_pb2.AbortRequest(request_id=request_id), timeout=2.0,
                                          wait_for_ready=False, metadata=self._auth)
            return resp.found
        except grpc.aio.AioRpcError as exc:
            log.debug("abort of %s failed: %s", request_id, exc.code())
            return False

    async def stats(self) -> scheduler_pb2.StatsResponse:
        try:
            return await self._stub.Stats(scheduler_pb2.StatsRequest(), timeout=2.0, wait_for_ready=False,
                                          metadata=self._auth)
        except grpc.aio.AioRpcError as exc:
            raise scheduler_error(exc) from None

    async def health(self, timeout_s: float = 1.0) -> tuple[bool, str]:
        """``(True, "")`` if the scheduler's grpc.health.v1 says SERVING, else ``(False, why)``."""
        try:
            resp = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            return False, f"scheduler {self.address} is unreachable ({exc.code().name}: {exc.details()})"
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            return False, f"scheduler {self.address} reports {status} (no executor ready?)"
        return True, ""


def continuation_request(msg: scheduler_pb2.SubmitRequest, streamed: list[int]) -> scheduler_pb2.SubmitRequest:
    """``msg`` continued after ``streamed`` tokens: those appended to the prompt, the rest of max_tokens
    (how a request moves to another pool, as the scheduler moves one between executors)."""
    out = scheduler_pb2.SubmitRequest()
    out.CopyFrom(msg)
    out.prompt_token_ids.extend(streamed)
    out.max_tokens = msg.max_tokens - len(streamed)
    return out


def length_final_event(request_id: str) -> scheduler_pb2.TokenEvent:
    """A final event for a request whose every token arrived but whose own final event was lost."""
    return scheduler_pb2.TokenEvent(request_id=request_id, finish_reason=common_pb2.FINISH_REASON_LENGTH)


def as_client_view(ev: scheduler_pb2.TokenEvent, *, first_of_pool: bool, gap_s: float, final: bool,
                   prompt_tokens: int, completion_tokens: int, ttft_s: float, e2e_s: float,
                   max_tbt_s: float) -> scheduler_pb2.TokenEvent:
    """Rewrite a continued request's event in the client's terms: the new pool's first token is not the
    client's first (TBT = ``gap_s``); the final event counts the original prompt and every token, with
    the first pool's TTFT and the gateway's clock for e2e and the largest gap."""
    if first_of_pool:
        ev.ttft_s = 0.0
        ev.tbt_s = gap_s
    if final:
        ev.usage.prompt_tokens = prompt_tokens
        ev.usage.completion_tokens = completion_tokens
        t = ev.timings
        t.ttft_s = ttft_s or t.ttft_s
        t.e2e_s = e2e_s
        t.max_tbt_s = max(t.max_tbt_s, max_tbt_s)
    return ev


def merge_stats(responses: list[scheduler_pb2.StatsResponse]) -> scheduler_pb2.StatsResponse:
    """Several pools' ``StatsResponse`` as one: every executor, the queues summed."""
    out = scheduler_pb2.StatsResponse(policy=responses[0].policy if responses else "")
    for r in responses:
        out.executors.extend(r.executors)
        out.num_queued_total += r.num_queued_total
        out.num_queued_prompt_tokens += r.num_queued_prompt_tokens
    return out

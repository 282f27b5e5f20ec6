"""The gateway's domain: admit, validate, tokenize, Submit, detokenize, stream.

Both front ends call :meth:`GenerationService.generate`, an async iterator of
:class:`~gateway.types.Delta`. Errors are plain exceptions that
``wire.grpc_server`` (gRPC) and ``gateway.http_api`` (HTTP) map to statuses:
``ValueError`` -> INVALID_ARGUMENT / 400, ``AdmissionRejected`` ->
RESOURCE_EXHAUSTED / 429, ``ConnectionError`` -> UNAVAILABLE / 503.

The gateway keeps no request state beyond the calls in flight (for Abort).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import codec
from telemetry import tracing
from wire.grpc_server import AdmissionRejected
from wire.service_auth import call_metadata
from telemetry.metrics import GatewayMetrics
from wire.pb.slai.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from wire import enums
from gateway.admission import Admission, Slot, current_slot
from gateway.config import GatewayConfig, TierPolicy
from gateway.readiness import Readiness
from gateway.stream_buffer import ABORTED, TokenBuffer
from gateway.tokenizer import LONG_TEXT_CHARS, ModelTokenizer
from gateway.types import Delta, GenerationInput, Timings
from gateway.validation import check_input, clip

log = logging.getLogger(__name__)

# Inputs up to this many characters are validated and tokenized on the event loop (under a
# millisecond); longer ones on a worker thread, so a long prompt never stalls other streams.
# docs/gateway.md ("Transport limits") has the measurements behind the number.
INLINE_PREPARE_CHARS = LONG_TEXT_CHARS
# Worker threads for long inputs: leave a core to the event loop (encode_batch releases the GIL).
PREPARE_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))
# After an input this long, hand the tokenizer's freed scratch memory back to the OS (see _trim_heap).
TRIM_AFTER_CHARS = 64 << 10

# NOTE: wait_for_ready=False makes an RPC fail at once while the channel is in
# TRANSIENT_FAILURE; these bound how long a connection attempt to a silent host
# can take (the default connect timeout is 20 s) and how soon a restarted
# scheduler is picked up again.
SCHEDULER_CHANNEL_OPTIONS = (
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
)


def scheduler_error(exc: grpc.aio.AioRpcError) -> Exception:
    """Translate the scheduler's status into the gateway's exception of the same meaning."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = 1.0
        for key, value in (exc.trailing_metadata() or ()):
            if key == "retry-after-s":
                try:
                    retry = float(value)
                except ValueError:
                    pass
        return AdmissionRejected(f"scheduler is full: {details}", retry_after_s=retry)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ConnectionError(f"scheduler unavailable: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return LookupError(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # the gateway's own configuration is wrong, not the client's request: a 503 naming the fix
        log.error("the scheduler refused the gateway: %s", details)
        return ConnectionError(f"scheduler unavailable: it refused this gateway's service token ({details}); "
                               "give the gateway the scheduler's SLAI_SERVICE_TOKEN")
    return RuntimeError(f"scheduler error {code.name}: {details}")


@dataclass(slots=True)
class _Prepared:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    submit: scheduler_pb2.SubmitRequest


class _TimingTracker:
    """Rebuilds a request's timings from its token events (used when we stop it early)."""

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


class GenerationService:
    """Stateless front half of the serving system (one per gateway process)."""

    def __init__(self, config: GatewayConfig, tokenizer: ModelTokenizer,
                 channel: grpc.aio.Channel | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = config.model_name or tokenizer.name
        self.max_model_len = config.max_model_len or tokenizer.max_model_len
        self._channel = channel or grpc.aio.insecure_channel(config.scheduler_address,
                                                             options=SCHEDULER_CHANNEL_OPTIONS)
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        self._auth = call_metadata(config.service_token)  # proves to the scheduler that this is the gateway
        self._in_flight: dict[str, grpc.aio.UnaryStreamCall | None] = {}
        self.metrics = GatewayMetrics()
        self.readiness = Readiness()  # kept by gateway.server's SchedulerWatcher; read by /health
        self._closing: str | None = None  # set by finish_in_flight: why every stream ends now
        self.admission = Admission(config.max_concurrent_requests)
        # A prompt longer than this cannot fit max_model_len tokens: no token is longer than
        # max_token_chars characters. Checked before tokenizing, so rejecting it costs nothing.
        self.max_prompt_chars = self.max_model_len * tokenizer.max_token_chars
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="gateway-prepare")

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    async def close(self) -> None:
        await self._channel.close()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    def scheduler_state(self) -> str:
        return self._channel.get_state(try_to_connect=True).name

    async def scheduler_health(self, timeout_s: float = 1.0) -> tuple[bool, str]:
        """``(True, "")`` if the scheduler's grpc.health.v1 says SERVING, else ``(False, why)``."""
        address = self.config.scheduler_address
        try:
            resp = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            return False, f"scheduler {address} is unreachable ({exc.code().name}: {exc.details()})"
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            return False, f"scheduler {address} reports {status} (no executor ready?)"
        return True, ""

    def finish_in_flight(self, reason: str) -> int:
        """End every request in flight now with ``ConnectionError(reason)`` (gRPC UNAVAILABLE, HTTP 503 or an
        SSE error event) and refuse new ones; used by the gateway's drain at its deadline. Cancelling the
        Submit streams aborts the requests at the scheduler. Returns how many were in flight."""
        self._closing = reason
        for call in list(self._in_flight.values()):
            if call is not None:
                call.cancel()
        return len(self._in_flight)

    # ------------------------------------------------------------ validation
    def check_input_size(self, inp: GenerationInput) -> int:
        """Reject an input that cannot fit the model, without tokenizing it; its size in characters.

        Cheap (no pass over the text), so it runs before the costly work and on the event loop.
        """
        limit = self.max_model_len
        if inp.prompt_token_ids is not None:
            n = len(inp.prompt_token_ids)
            if n >= limit:
                raise ValueError(f"prompt: {n} tokens; this model allows at most {limit - 1} prompt tokens "
                                 f"({limit} in all)")
            return n
        if inp.messages is not None:
            if len(inp.messages) >= limit:  # every message adds at least one token
                raise ValueError(f"messages: {len(inp.messages)} messages cannot fit this model's {limit}-token "
                                 f"limit")
            # NOTE: contents only: a role is one of a few names (checked later, naming messages[i].role)
            size = sum(len(c) for _, c in inp.messages if isinstance(c, str))
            roles = sum(len(r) for r, _ in inp.messages if isinstance(r, str))
            field, cost = "messages", size + roles + 32 * len(inp.messages)  # the template's work per message
        else:
            size = len(inp.prompt or "")
            field, cost = "prompt", size
        if size > self.max_prompt_chars:
            raise ValueError(f"{field}: {size} characters cannot fit this model's {limit}-token limit (a token "
                             f"has at most {self.tokenizer.max_token_chars} characters, so at most "
                             f"{self.max_prompt_chars} characters)")
        return cost

    async def prepare_async(self, inp: GenerationInput, tier: TierPolicy) -> _Prepared:
        """:meth:`prepare` after the cheap size check; a long input is prepared on a worker thread."""
        size = self.check_input_size(inp)
        if size <= INLINE_PREPARE_CHARS:
            return self.prepare(inp, tier)
        loop = asyncio.get_running_loop()
        prep = await loop.run_in_executor(self._prepare_pool, self._prepare_long, inp, tier, size)
        if prep.request_id in self._in_flight:  # prepare checked it, but the loop ran on meanwhile
            raise ValueError(f"request_id: {prep.request_id!r} is already in flight")
        return prep

    def _prepare_long(self, inp: GenerationInput, tier: TierPolicy, size: int) -> _Prepared:
        try:
            return self.prepare(inp, tier)
        finally:
            if size > TRIM_AFTER_CHARS:
                _trim_heap()

    def prepare(self, inp: GenerationInput, tier: TierPolicy) -> _Prepared:
        """Validate and tokenize; raises ValueError naming the offending field."""
        check_input(inp, self.model_name, self.max_model_len)
        if inp.messages is not None:
            try:
                prompt_ids = self.tokenizer.encode_chat([{"role": r, "content": c} for r, c in inp.messages])
            except ValueError:
                raise
            except Exception as exc:  # jinja2 TemplateError from raise_exception in the template
                raise ValueError(f"messages: {exc}") from exc
        elif inp.prompt_token_ids is not None:
            prompt_ids = list(inp.prompt_token_ids)
            vocab = self.tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        else:
            if not inp.prompt:
                raise ValueError("prompt: must not be empty")
            prompt_ids = self.tokenizer.encode(inp.prompt)
        if not prompt_ids:
            raise ValueError("prompt: must not be empty (it encodes to no tokens)")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            field = "messages" if inp.messages is not None else "prompt"
            raise ValueError(f"{field}: {len(prompt_ids)} tokens; this model allows at most "
                             f"{self.max_model_len - 1} prompt tokens ({self.max_model_len} in all)")
        if inp.max_tokens < 0:
            raise ValueError(f"max_tokens: must be >= 1, got {inp.max_tokens}")
        if inp.max_tokens == 0:
            max_tokens = min(self.config.default_max_tokens, room)
        elif inp.max_tokens > room:
            raise ValueError(f"max_tokens: {inp.max_tokens} plus {len(prompt_ids)} prompt tokens exceeds the "
                             f"model's {self.max_model_len}-token limit (at most {room} here)")
        else:
            max_tokens = inp.max_tokens
        request_id = inp.request_id or f"gw-{uuid.uuid4().hex}"
        if request_id in self._in_flight:
            raise ValueError(f"request_id: {clip(request_id)} is already in flight")
        sampling = common_pb2.SamplingParams(
            temperature=inp.temperature, top_p=inp.top_p, top_k=inp.top_k,
            stop_token_ids=self.tokenizer.eos_token_ids, ignore_eos=inp.ignore_eos)
        if inp.seed is not None:
            sampling.seed = inp.seed
        submit = scheduler_pb2.SubmitRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling,
            tier=enums.TIER_TO_PB[tier.tier], tbt_slo_s=tier.tbt_slo_s, ttft_slo_s=tier.ttft_slo_s)
        return _Prepared(request_id, prompt_ids, max_tokens, submit)

    # ------------------------------------------------------------ streaming
    async def generate(self, inp: GenerationInput, tier: TierPolicy, carrier=None) -> AsyncIterator[Delta]:
        """Stream a request's deltas; the last one has ``finish_reason`` set.

        ``carrier``: the caller's gRPC metadata or HTTP headers (trace context).
        """
        # NOTE: admission first, before any costly work (docs/gateway.md, "Transport limits").
        slot = self._admit(tier)
        try:
            prep = await self.prepare_async(inp, tier)
        except BaseException:
            slot.release()
            raise
        rid = prep.request_id
        self._in_flight[rid] = None
        self.metrics.in_flight.inc()
        span = tracing.start_request_span(
            rid, carrier=carrier, tier=tier.tier, max_tokens=prep.max_tokens, temperature=inp.temperature,
            top_p=inp.top_p, prompt_tokens=len(prep.prompt_ids), tbt_slo_s=tier.tbt_slo_s,
            ttft_slo_s=tier.ttft_slo_s, model=self.model_name)
        outcome, last, error = "cancelled", None, None
        stream = self._stream(prep, inp, span)
        try:
            async for delta in stream:
                last = delta
                if delta.finish_reason is not None:
                    outcome = "ok"  # the consumer may close us right after the last delta
                yield delta
            outcome = "ok"
        except GeneratorExit:
            raise
        except asyncio.CancelledError:
            raise
        except AdmissionRejected as exc:
            outcome, error = "rejected", exc
            raise
        except Exception as exc:
            outcome, error = "error", exc
            raise
        finally:
            await stream.aclose()  # now, not at garbage collection: it cancels the Submit call
            slot.release()
            self.metrics.in_flight.dec()
            self.metrics.record_request(tier.tier, outcome)
            t = last.timings if last is not None and last.timings is not None else None
            tracing.end_request_span(
                span, finish_reason=last.finish_reason if last else None,
                completion_tokens=last.completion_tokens if last and last.finish_reason else None,
                ttft_s=t.ttft_s if t else None, e2e_s=t.e2e_s if t else None, queue_s=t.queue_s if t else None,
                max_tbt_s=t.max_tbt_s if t else None, num_preemptions=t.num_preemptions if t else None, error=error)

    def _admit(self, tier: TierPolicy) -> Slot:
        """The slot the HTTP front end took for this request, or a new one (gRPC)."""
        slot = current_slot()
        if slot is not None and not slot.claimed:
            slot.claimed = True
            return slot
        try:
            slot = self.admission.acquire()
        except AdmissionRejected:
            self.metrics.record_request(tier.tier, "rejected")
            raise
        slot.claimed = True
        return slot

    async def _stream(self, prep: _Prepared, inp: GenerationInput, span) -> AsyncIterator[Delta]:
        rid = prep.request_id
        text = self.tokenizer.detokenizer(prep.prompt_ids, list(inp.stop))
        tracker = _TimingTracker()
        call = None
        reader = None
        finished = False
        first = True
        try:
            if self._closing is not None:
                raise ConnectionError(self._closing)
            call = self._stub.Submit(prep.submit, timeout=self.config.request_timeout_s, wait_for_ready=False,
                                     metadata=call_metadata(self.config.service_token,
                                                            tracing.grpc_metadata(span)))
            self._in_flight[rid] = call
            # NOTE: reading the Submit stream in its own task keeps a client that stops reading from
            # holding the request open without bound: the reader stops at a full buffer and aborts the
            # request once the client has taken nothing for --stream-stall-timeout (docs/gateway.md).
            buf = TokenBuffer(self.config.stream_buffer_tokens, self.config.stream_stall_timeout_s)
            reader = asyncio.get_running_loop().create_task(self._read(rid, call, buf, tracker))
            while True:
                ids, end = await buf.take()
                if first:
                    first = False
                    tracing.mark_first_token(span)
                delta_text = ""
                if ids:
                    num_before = text.num_tokens
                    delta_text, stopped = text.add(ids)
                    if stopped:
                        finished = True
                        if end is None:  # the request still runs upstream
                            self._abort_upstream(rid, call)
                        yield Delta(rid, delta_text, tuple(ids[:text.num_tokens - num_before]), "stop",
                                    len(prep.prompt_ids), text.num_tokens, tracker.timings())
                        return
                if end is None or isinstance(end, BaseException):
                    if delta_text or ids:
                        yield Delta(rid, delta_text, tuple(ids))
                    if end is not None:
                        raise end
                    continue
                finished = True
                delta_text += text.finish()
                if end is ABORTED:  # aborted (Abort, a stalled client) or the scheduler went away
                    yield Delta(rid, delta_text, tuple(ids), "abort", len(prep.prompt_ids), text.num_tokens,
                                tracker.timings())
                    return
                ev = end
                timings = codec.timings_from_pb(ev.timings) if ev.HasField("timings") else tracker.timings()
                if timings.ttft_s == 0 and timings.e2e_s == 0:
                    timings = tracker.timings()
                completion = ev.usage.completion_tokens if ev.HasField("usage") else text.num_tokens
                yield Delta(rid, delta_text, tuple(ids), enums.FINISH_FROM_PB[ev.finish_reason],
                            len(prep.prompt_ids), completion or text.num_tokens, timings)
                return
        finally:
            if reader is not None:
                reader.cancel()
            if self._in_flight.get(rid) is call:  # not a newer request that reuses the id after an abort
                del self._in_flight[rid]
            if not finished and call is not None:
                # the client went away (or an error): cancelling the Submit stream aborts upstream
                call.cancel()

    async def _read(self, rid: str, call: grpc.aio.UnaryStreamCall, buf: TokenBuffer,
                    tracker: _TimingTracker) -> None:
        """Pull ``call``'s events into ``buf`` until the stream ends or the client stalls."""
        try:
            async for ev in call:
                tracker.on_event(ev)
                if ev.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    buf.close(ev, ev.token_ids)
                    return
                buf.push(ev.token_ids)
                if buf.full and not await buf.wait_for_room():
                    log.warning("request %s: the client took nothing for %.1f s with %d tokens waiting; aborting it",
                                rid, buf.stall_timeout_s, buf.num_tokens)
                    if self._in_flight.get(rid) is call:
                        del self._in_flight[rid]  # it no longer counts against --max-concurrent-requests
                    self._abort_upstream(rid, call)
                    buf.close(ABORTED)
                    return
            buf.close(ABORTED)  # the stream ended without a finish reason
        except grpc.aio.AioRpcError as exc:
            if self._closing is not None:
                buf.close(ConnectionError(self._closing))  # finish_in_flight cancelled the call
            elif exc.code() == grpc.StatusCode.CANCELLED and self._in_flight.get(rid) is not call:
                buf.close(ABORTED)  # aborted through the gateway's Abort
            else:
                buf.close(scheduler_error(exc))
        except asyncio.CancelledError:
            # NOTE: a locally cancelled call raises CancelledError from its iterator (Abort and
            # finish_in_flight cancel it); a cancellation of this task (the consumer is gone) must propagate.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            buf.close(ConnectionError(self._closing) if self._closing is not None else ABORTED)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            buf.close(exc)

    def _abort_upstream(self, rid: str, call: grpc.aio.UnaryStreamCall) -> None:
        # Cancelling the Submit stream is the abort (scheduler.proto); Abort makes it explicit.
        call.cancel()
        asyncio.get_running_loop().create_task(self._send_abort(rid))

    async def _send_abort(self, rid: str) -> bool:
        try:
            resp = await self._stub.Abort(scheduler_pb2.AbortRequest(request_id=rid), timeout=2.0,
                                          wait_for_ready=False, metadata=self._auth)
            return resp.found
        except grpc.aio.AioRpcError as exc:
            log.debug("abort of %s failed: %s", rid, exc.code())
            return False

    async def abort(self, request_id: str) -> bool:
        """Abort a request (the local stream if it runs here, and at the scheduler)."""
        call = self._in_flight.pop(request_id, None) if request_id in self._in_flight else None
        local = call is not None
        if call is not None:
            call.cancel()
        upstream = await self._send_abort(request_id)
        return local or upstream

    async def stats(self) -> scheduler_pb2.StatsResponse:
        try:
            return await self._stub.Stats(scheduler_pb2.StatsRequest(), timeout=2.0, wait_for_ready=False,
                                          metadata=self._auth)
        except grpc.aio.AioRpcError as exc:
            raise scheduler_error(exc) from None


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _trim_heap() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Tokenizing a long text allocates tens of MB of scratch (a 600 K-character prompt:
    about 90 MB) that glibc keeps in its free lists, and in the worker thread's own
    arena, after it is freed. Trimming takes about 10 ms, on the worker thread.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

"""The gateway's domain: admit, validate, tokenize, Submit, detokenize, stream.

Both front ends call :meth:`GenerationService.generate`, an async iterator of
:class:`~gateway.types.Delta`. Errors are plain exceptions that
``common.grpc_server`` (gRPC) and ``gateway.http_api`` (HTTP) map to statuses:
``ValueError`` -> INVALID_ARGUMENT / 400, ``AdmissionRejected`` ->
RESOURCE_EXHAUSTED / 429, ``ConnectionError`` -> UNAVAILABLE / 503.

The gateway keeps no request state beyond the calls in flight (for Abort).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from common import codec, telemetry
from common.grpc_server import AdmissionRejected
from common.metrics import GatewayMetrics
from common.pb.slai.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from gateway.admission import Admission, Slot, current_slot
from gateway.config import GatewayConfig, TierPolicy
from gateway.tokenizer import LONG_TEXT_CHARS, ModelTokenizer
from gateway.types import Delta, GenerationInput, Timings

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_SEED = 2**64 - 1
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
        self._in_flight: dict[str, grpc.aio.UnaryStreamCall | None] = {}
        self.metrics = GatewayMetrics()
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
            size = sum(len(r) + len(c) for r, c in inp.messages if isinstance(r, str) and isinstance(c, str))
            field, cost = "messages", size + 32 * len(inp.messages)  # the template's work per message
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
        if inp.model and inp.model != self.model_name:
            raise ValueError(f"model: unknown model {inp.model!r}; this gateway serves {self.model_name!r}")
        _check_sampling(inp)
        if inp.messages is not None:
            if not inp.messages:
                raise ValueError("messages: must contain at least one message")
            for i, (role, content) in enumerate(inp.messages):
                if role not in ("system", "user", "assistant", "tool", "developer"):
                    raise ValueError(f"messages[{i}].role: unknown role {role!r}")
                if not isinstance(content, str):
                    raise ValueError(f"messages[{i}].content: must be text")
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
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        sampling = common_pb2.SamplingParams(
            temperature=inp.temperature, top_p=inp.top_p, top_k=inp.top_k,
            stop_token_ids=self.tokenizer.eos_token_ids, ignore_eos=inp.ignore_eos)
        if inp.seed is not None:
            sampling.seed = inp.seed
        submit = scheduler_pb2.SubmitRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling,
            tier=codec.TIER_TO_PB[tier.tier], tbt_slo_s=tier.tbt_slo_s, ttft_slo_s=tier.ttft_slo_s)
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
        span = telemetry.start_request_span(
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
            telemetry.end_request_span(
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
        finished = False
        first = True
        try:
            call = self._stub.Submit(prep.submit, timeout=self.config.request_timeout_s, wait_for_ready=False,
                                     metadata=telemetry.grpc_metadata(span) or None)
            self._in_flight[rid] = call
            try:
                async for ev in call:
                    if first:
                        first = False
                        telemetry.mark_first_token(span)
                    tracker.on_event(ev)
                    num_before = text.num_tokens
                    delta_text, stopped = text.add(ev.token_ids)
                    if stopped:
                        finished = True
                        self._abort_upstream(rid, call)
                        yield Delta(rid, delta_text, tuple(ev.token_ids[:text.num_tokens - num_before]), "stop",
                                    len(prep.prompt_ids), text.num_tokens, tracker.timings())
                        return
                    if ev.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        finished = True
                        delta_text += text.finish()
                        timings = codec.timings_from_pb(ev.timings) if ev.HasField("timings") else tracker.timings()
                        if timings.ttft_s == 0 and timings.e2e_s == 0:
                            timings = tracker.timings()
                        completion = ev.usage.completion_tokens if ev.HasField("usage") else text.num_tokens
                        yield Delta(rid, delta_text, tuple(ev.token_ids), codec.FINISH_FROM_PB[ev.finish_reason],
                                    len(prep.prompt_ids), completion or text.num_tokens, timings)
                        return
                    if delta_text or ev.token_ids:
                        yield Delta(rid, delta_text, tuple(ev.token_ids))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and rid not in self._in_flight:
                    pass  # aborted through the gateway's Abort
                else:
                    raise scheduler_error(exc) from None
            except asyncio.CancelledError:
                # NOTE: a locally cancelled call raises CancelledError from its iterator.
                # Abort() cancels it after dropping rid from _in_flight; a real cancellation
                # of this task (the client went away) must propagate.
                task = asyncio.current_task()
                if rid in self._in_flight or (task is not None and task.cancelling()):
                    raise
            # the stream ended without a finish reason: aborted (by Abort) or the scheduler went away
            finished = True
            yield Delta(rid, text.finish(), (), "abort", len(prep.prompt_ids), text.num_tokens, tracker.timings())
        finally:
            self._in_flight.pop(rid, None)
            if not finished and call is not None:
                # the client went away (or an error): cancelling the Submit stream aborts upstream
                call.cancel()

    def _abort_upstream(self, rid: str, call: grpc.aio.UnaryStreamCall) -> None:
        # Cancelling the Submit stream is the abort (scheduler.proto); Abort makes it explicit.
        call.cancel()
        asyncio.get_running_loop().create_task(self._send_abort(rid))

    async def _send_abort(self, rid: str) -> bool:
        try:
            resp = await self._stub.Abort(scheduler_pb2.AbortRequest(request_id=rid), timeout=2.0,
                                          wait_for_ready=False)
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
            return await self._stub.Stats(scheduler_pb2.StatsRequest(), timeout=2.0, wait_for_ready=False)
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


def _check_sampling(inp: GenerationInput) -> None:
    if not math.isfinite(inp.temperature) or inp.temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {inp.temperature}")
    if inp.temperature > 100:
        raise ValueError(f"temperature: must be <= 100, got {inp.temperature}")
    if not math.isfinite(inp.top_p) or not 0 < inp.top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {inp.top_p}")
    if inp.top_k < 0:
        raise ValueError(f"top_k: must be >= 0, got {inp.top_k}")
    if inp.seed is not None and not 0 <= inp.seed <= MAX_SEED:
        raise ValueError(f"seed: must be in [0, 2^64), got {inp.seed}")
    if len(inp.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings")
    for s in inp.stop:
        if not s or len(s) > MAX_STOP_LEN:
            raise ValueError(f"stop: each stop string must have 1..{MAX_STOP_LEN} characters")

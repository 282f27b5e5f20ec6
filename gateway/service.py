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
import dataclasses
import logging
from typing import AsyncIterator

import grpc

from gateway.admission import Admission, Slot, current_slot
from gateway.config import GatewayConfig, TierPolicy
from gateway.fan_out import fan_out, merge_streams
from gateway.logprobs import LogprobsTracker
from gateway.pools import PoolCall, PoolSet
from gateway.prepare import Prepared, Preparer
from gateway.readiness import Readiness
from gateway.scheduler_client import SchedulerClient, TimingTracker, event_logprobs, merge_stats
from gateway.scheduler_session import CallCancelled
from gateway.slo_headers import with_slo_headers
from gateway.stream_buffer import ABORTED, TokenBuffer
from gateway.tokenizer import ModelTokenizer
from gateway.types import Delta, GenerationInput
from telemetry import tracing
from telemetry.metrics import GatewayMetrics
from wire.grpc_server import AdmissionRejected, DeadlineExceeded

log = logging.getLogger(__name__)


class GenerationService:
    """Stateless front half of the serving system (one per gateway process)."""

    def __init__(self, config: GatewayConfig, tokenizer: ModelTokenizer,
                 channel: grpc.aio.Channel | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = config.model_name or tokenizer.name
        self.max_model_len = config.max_model_len or tokenizer.max_model_len
        # one scheduler client (one Session stream) per pool; ``channel`` (tests) is the first pool's
        self.pools = PoolSet([SchedulerClient(config, channel if i == 0 else None, address=a)
                              for i, a in enumerate(config.pool_addresses)], config.pool_routing)
        if config.pools_dns:  # one DNS name: follow its addresses as pools are scaled
            self.pools.follow(config.pools_dns, lambda address: SchedulerClient(config, address=address))
        self._in_flight: dict[str, PoolCall | None] = {}
        self.metrics = GatewayMetrics()
        self.readiness = Readiness()  # kept by gateway.server's SchedulerWatcher; read by /health
        self._closing: str | None = None  # set by finish_in_flight: why every stream ends now
        self.admission = Admission(config.max_concurrent_requests)
        self.preparer = Preparer(config, tokenizer, self.model_name, self.max_model_len,
                                 in_flight=lambda rid: rid in self._in_flight)

    @property
    def scheduler(self) -> SchedulerClient:
        """The first pool's scheduler (Stats and the channel state in ``/health`` with one pool)."""
        return self.pools.first

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def max_prompt_chars(self) -> int:
        """Longest prompt, in characters, that could fit the model (checked before tokenizing)."""
        return self.preparer.max_prompt_chars

    async def close(self) -> None:
        await self.pools.close()
        self.preparer.close()

    def scheduler_state(self) -> str:
        return self.scheduler.state()

    async def scheduler_health(self, timeout_s: float = 1.0) -> tuple[bool, str]:
        """``(True, "")`` if a pool's scheduler says SERVING (grpc.health.v1), else ``(False, why)``.
        Each check also puts pools back into rotation or takes them out (gateway/pools.py)."""
        return await self.pools.health(timeout_s)

    def finish_in_flight(self, reason: str) -> int:
        """End every request in flight now with ``ConnectionError(reason)`` (gRPC UNAVAILABLE, HTTP 503 or an
        SSE error event) and refuse new ones; used by the gateway's drain at its deadline. Cancelling the
        Submit streams aborts the requests at the scheduler. Returns how many were in flight."""
        self._closing = reason
        for call in list(self._in_flight.values()):
            if call is not None:
                call.cancel()
        return len(self._in_flight)

    def prepare(self, inp: GenerationInput, tier: TierPolicy) -> Prepared:
        """Validate and tokenize on this thread; raises ValueError naming the offending field."""
        return self.preparer.prepare(inp, tier)

    # ------------------------------------------------------------ streaming
    async def generate(self, inp: GenerationInput, tier: TierPolicy, carrier=None) -> AsyncIterator[Delta]:
        """Stream a request's deltas; the last one has ``finish_reason`` set.

        ``carrier``: the caller's gRPC metadata or HTTP headers (trace context; llm-d's SLO headers,
        which may loosen the tier's objectives but never tighten them: gateway/slo_headers.py).
        """
        tier = with_slo_headers(tier, carrier)  # ValueError naming a malformed header: 400 / INVALID_ARGUMENT
        # NOTE: admission first, before any costly work (docs/gateway.md, "Transport limits").
        slot = self._admit(tier)
        slots = [slot]
        try:
            if inp.n > 1:  # n completions are n requests' work: each holds a slot (all or none)
                slots += self._admit_more(inp.n - 1, tier)
            prep = await self.preparer.prepare_async(inp, tier)
            preps = [prep] if inp.n == 1 else fan_out(prep, inp.n, self._in_flight.__contains__)
        except BaseException:
            for s in slots:
                s.release()
            raise
        rid = prep.request_id
        for p in preps:
            self._in_flight[p.request_id] = None
        self.metrics.in_flight.inc()
        span = tracing.start_request_span(
            rid, carrier=carrier, tier=tier.tier, max_tokens=prep.max_tokens, temperature=inp.temperature,
            top_p=inp.top_p, prompt_tokens=len(prep.prompt_ids), tbt_slo_s=tier.tbt_slo_s,
            ttft_slo_s=tier.ttft_slo_s, model=self.model_name)
        outcome, last, error = "cancelled", None, None
        if len(preps) == 1:
            # NOTE: without echo, _stream would only pass deltas through (one async generator less per token)
            stream = self._stream(prep, inp, span) if inp.echo else self._stream_one(prep, inp, span)
        else:
            stream = merge_streams([self._stream(p, inp, span, index=i, parent=rid) for i, p in enumerate(preps)])
        num_finished = 0
        try:
            async for delta in stream:
                last = delta
                if delta.finish_reason is not None:
                    num_finished += 1
                    if num_finished == len(preps):
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
            for s in slots:
                s.release()
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

    def _admit_more(self, k: int, tier: TierPolicy) -> list[Slot]:
        """``k`` more slots for the other completions of an ``n > 1`` request."""
        if k + 1 > self.admission.limit:
            raise ValueError(f"n: {k + 1} completions are more than this gateway admits at once "
                             f"({self.admission.limit})")
        try:
            return self.admission.acquire_many(k)
        except AdmissionRejected:
            self.metrics.record_request(tier.tier, "rejected")
            raise

    async def _stream(self, prep: Prepared, inp: GenerationInput, span, index: int = 0,
                      parent: str | None = None) -> AsyncIterator[Delta]:
        """One completion's deltas; completion ``index`` of request ``parent`` when ``n > 1``.
        With ``echo`` the first delta also carries the prompt's token ids."""
        echo = inp.echo
        async for d in self._stream_one(prep, inp, span):
            if parent is not None or echo:
                d = dataclasses.replace(d, index=index, request_id=parent or d.request_id,
                                        prompt_token_ids=tuple(prep.prompt_ids) if echo else None)
                echo = False
            yield d

    async def _stream_one(self, prep: Prepared, inp: GenerationInput, span) -> AsyncIterator[Delta]:
        rid = prep.request_id
        text = self.tokenizer.detokenizer(prep.prompt_ids, list(inp.stop))
        lp = LogprobsTracker(inp, len(prep.prompt_ids))
        user_stops = frozenset(inp.stop_token_ids)
        tracker = TimingTracker()
        call = None
        finished = False
        first = True
        # NOTE: the Session's reader files this request's events straight into its buffer (no task per
        # request: docs/gateway.md, "Gateway streaming capacity"); a client that stops reading is
        # aborted once its buffer stayed full for --stream-stall-timeout (docs/gateway.md).
        relay = _Relay(self, rid, tracker)
        buf = relay.buf = TokenBuffer(self.config.stream_buffer_tokens, self.config.stream_stall_timeout_s,
                                      relay.stalled)
        deadline = None
        try:
            if self._closing is not None:
                raise ConnectionError(self._closing)
            call = relay.call = self.pools.submit(prep.submit, relay, tracing.grpc_metadata(span))
            self._in_flight[rid] = call
            # a request still running after --request-timeout is aborted upstream and ends DEADLINE_EXCEEDED
            deadline = asyncio.get_running_loop().call_later(self.config.request_timeout_s, relay.timed_out)
            while True:
                ids, lps, end = await buf.take_with_logprobs()
                if first:
                    first = False
                    tracing.mark_first_token(span)
                prompt_lps = lp.prompt(lps)
                if inp.score_only:
                    # the one token generated is not the client's: only the prompt's logprobs are
                    finished = True
                    if end is None:
                        self._abort_upstream(rid, call)
                    elif isinstance(end, BaseException):
                        raise end
                    reason = "abort" if end is ABORTED and prompt_lps is None else "length"
                    yield Delta(rid, "", (), reason, len(prep.prompt_ids), 0, tracker.timings(),
                                prompt_logprobs=prompt_lps)
                    return
                delta_text = ""
                if ids:
                    num_before = text.num_tokens
                    shown = ids
                    if user_stops and end is not None and ids[-1] in user_stops and not isinstance(
                            end, BaseException) and end is not ABORTED:
                        shown = ids[:-1]  # a client's stop token ends the text without showing (vLLM)
                    delta_text, stopped = text.add(shown)
                    if stopped:
                        finished = True
                        if end is None:  # the request still runs upstream
                            self._abort_upstream(rid, call)
                        kept = text.num_tokens - num_before
                        yield Delta(rid, delta_text, tuple(ids[:kept]), "stop", len(prep.prompt_ids),
                                    text.num_tokens, tracker.timings(), logprobs=lp.tokens(lps, kept),
                                    prompt_logprobs=prompt_lps)
                        return
                if end is None or isinstance(end, BaseException):
                    if delta_text or ids or prompt_lps is not None:
                        yield Delta(rid, delta_text, tuple(ids), logprobs=lp.tokens(lps, len(ids)),
                                    prompt_logprobs=prompt_lps)
                    if end is not None:
                        raise end
                    continue
                finished = True
                delta_text += text.finish()
                if end is ABORTED:  # aborted (Abort, a stalled client) or the scheduler went away
                    yield Delta(rid, delta_text, tuple(ids), "abort", len(prep.prompt_ids), text.num_tokens,
                                tracker.timings(), logprobs=lp.tokens(lps, len(ids)), prompt_logprobs=prompt_lps)
                    return
                reason, completion, timings = tracker.final(end)
                yield Delta(rid, delta_text, tuple(ids), reason, len(prep.prompt_ids),
                            completion or text.num_tokens, timings, logprobs=lp.tokens(lps, len(ids)),
                            prompt_logprobs=prompt_lps)
                return
        finally:
            if deadline is not None:
                deadline.cancel()
            buf.close(ABORTED)  # nothing more is taken (disarms the stall timer)
            self._forget(rid, call)
            if not finished and call is not None:
                # the client went away (or an error): cancelling the Submit stream aborts upstream
                call.cancel()

    def _forget(self, rid: str, call: PoolCall | None) -> None:
        """``call`` no longer counts against --max-concurrent-requests (unless ``rid`` is a newer request's
        now, which reuses the id after an abort)."""
        if self._in_flight.get(rid) is call:
            del self._in_flight[rid]

    def _abort_upstream(self, rid: str, call: PoolCall) -> None:
        # cancelling the call sends an abort on its pool's Session stream (scheduler.proto)
        call.cancel()

    async def _send_abort(self, rid: str) -> bool:
        """Abort ``rid`` at every pool (it may run on one through another gateway)."""
        found = await asyncio.gather(*(p.client.abort(rid) for p in self.pools.pools))
        return any(found)

    async def abort(self, request_id: str) -> bool:
        """Abort a request (the local stream if it runs here, and at the scheduler).

        An ``n > 1`` request runs as ``<request_id>-<i>``: aborting ``request_id`` aborts them all.
        """
        if request_id not in self._in_flight and f"{request_id}-0" in self._in_flight:
            found = False
            i = 0
            while f"{request_id}-{i}" in self._in_flight:
                found = await self.abort(f"{request_id}-{i}") or found
                i += 1
            return found
        call = self._in_flight.pop(request_id, None) if request_id in self._in_flight else None
        local = call is not None
        if call is not None:
            call.cancel()
        upstream = await self._send_abort(request_id)
        return local or upstream

    async def stats(self):
        """The scheduler's ``StatsResponse`` (with several pools: their executors and queues together)."""
        if len(self.pools.pools) == 1:
            return await self.scheduler.stats()
        return merge_stats(await asyncio.gather(*(p.client.stats() for p in self.pools.pools)))


class _Relay:
    """One request's sink on its ``PoolCall``: each ``TokenEvent`` (or the exception that ends the call)
    goes into the request's ``TokenBuffer`` as the Session's reader demultiplexes it."""

    __slots__ = ("buf", "call", "rid", "service", "tracker")

    def __init__(self, service: GenerationService, rid: str, tracker: TimingTracker) -> None:
        self.service = service
        self.rid = rid
        self.tracker = tracker
        self.buf: TokenBuffer | None = None
        self.call: PoolCall | None = None

    def __call__(self, item) -> None:
        buf = self.buf
        if isinstance(item, BaseException):
            if isinstance(item, CallCancelled):
                # cancelled here: Abort, a stop sequence, a stall, or finish_in_flight (the drain's cut)
                closing = self.service._closing
                buf.close(ConnectionError(closing) if closing is not None else ABORTED)
            else:
                buf.close(item)
            return
        try:
            self.tracker.on_event(item)
            lps = event_logprobs(item)
            if item.finish_reason:  # final
                buf.close(item, item.token_ids, lps)
            else:
                buf.push(item.token_ids, lps)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            log.exception("request %s: bad event", self.rid)
            buf.close(exc)

    def stalled(self) -> None:
        """The client took nothing for --stream-stall-timeout with a full buffer: abort the request."""
        buf, call = self.buf, self.call
        log.warning("request %s: the client took nothing for %.1f s with %d tokens waiting; aborting it",
                    self.rid, buf.stall_timeout_s, buf.num_tokens)
        self.service._forget(self.rid, call)
        if call is not None:
            call.cancel()  # an abort on its pool's Session stream; the buffer ends with ABORTED
        buf.close(ABORTED)

    def timed_out(self) -> None:
        """The request ran past --request-timeout: abort it upstream; its stream ends with ``DeadlineExceeded``."""
        buf, call = self.buf, self.call
        timeout_s = self.service.config.request_timeout_s
        self.service._forget(self.rid, call)
        # NOTE: the buffer's end first: cancelling the call hands the sink CallCancelled, which would end it ABORTED
        buf.close(DeadlineExceeded(f"request {self.rid} was still running after the gateway's request timeout of "
                                   f"{timeout_s:g} s (--request-timeout-s); it was aborted"))
        if call is not None:
            call.cancel()

"""SchedulerCore: the whole scheduler as two calls, driven alike by the service and the simulator.

    plan = core.schedule(now)
    result = runner.execute(plan)          # gRPC in the service, a cost model in the simulator
    events = core.update(plan, result, now)

plus ``add`` and ``abort``. Time is always passed in; nothing here reads a clock.
The policy (a strategy object) decides order, budget split and victims; this
class owns request state, KV placement and the plan/result protocol.

Pipelining (the service only): ``schedule`` may be called once more while one
plan is in flight, so the executor finds step N+1 queued when it finishes step
N. The core then *advances* the in-flight plan optimistically before deciding:
chunks count as computed, every sampling slice counts one output token whose id
is still pending, requests reaching ``max_tokens`` finish, and the policy's
``on_step_end`` runs at the plan's expected end. ``update`` later *confirms* it:
token ids, timestamps and stop tokens. What optimism gets wrong is cheap: a
request that samples a stop token may already be in the next plan, whose token
for it is then dropped (one wasted decode); a request preempted while its token
is pending is not re-admitted until the token is known.
"""

from __future__ import annotations

import itertools
from collections import deque

from contract.lifecycle import EventKind, LifecycleEvent
from contract.plan import BatchPlan, PlanStats, StepResult
from scheduler_svc.core.batch_builder import BatchBuilder
from scheduler_svc.core.batch_time import BatchTimeEstimator, make_estimator
from scheduler_svc.core.config import SchedulerConfig
from scheduler_svc.core.kv_blocks import BlockAllocator
from scheduler_svc.core.policies.base import Policy
from scheduler_svc.core.prefix_cache import PrefixCachingAllocator
from scheduler_svc.core.request import FINISH_REASONS, Request, RequestStatus
from scheduler_svc.core.token_event import TokenEvent


class SchedulerCore:
    """All scheduling state for one executor (one KV pool)."""

    def __init__(self, policy: Policy, num_blocks: int, config: SchedulerConfig | None = None,
                 estimator: BatchTimeEstimator | None = None, record_events: bool = False) -> None:
        self.config = config or policy.config
        self.policy = policy
        cfg = self.config
        if cfg.enable_prefix_caching:
            self.allocator = self.prefix_cache = PrefixCachingAllocator(num_blocks, cfg.block_size, cfg.watermark)
        else:
            self.allocator = BlockAllocator(num_blocks, cfg.block_size, cfg.watermark)
            self.prefix_cache = None
        self.estimator = estimator or make_estimator(self.config.mean_estimator)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.running: dict[str, Request] = {}  # requests holding KV, admission order
        self.last_batch_end_s: float | None = None
        self.last_step_s = 0.0  # duration of the last non-empty step (schedule -> update)
        self.last_step_tokens = 0  # tokens in that step
        self.last_step_plan: BatchPlan | None = None  # that step's plan (policies that fit its composition)
        # how many of the requests passed to the policy's ``on_step_end`` still have prompt left to compute
        # (the others decode); None where not counted. Lets a policy skip re-testing each one (Policy.on_step_end)
        self.last_served_prefilling: int | None = None
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_waiting_tokens = 0  # uncomputed (uncached) prompt tokens of waiting requests (admission control)
        self._record_events = record_events
        self._events: list[LifecycleEvent] = []
        self._seq = itertools.count()
        self._step_ids = itertools.count(1)
        self._in_flight: deque[tuple[BatchPlan, float]] = deque()  # (plan, scheduled at)
        self._advanced: tuple[BatchPlan, list[Request]] | None = None  # applied ahead; its sampling requests
        self._last_result_s: float | None = None  # when the last result was applied
        self._known_to_runner: set[str] = set()  # sent as `new`, not yet released
        self._release_finished: list[str] = []
        self._release_preempted: list[str] = []
        self._rematched: set[str] = set()  # waiting requests whose cached prefix changed (take_rematched_ids)
        policy.bind(self)

    # ------------------------------------------------------------------ queries
    @property
    def num_waiting(self) -> int:
        """Requests not holding KV (waiting, preempted)."""
        return len(self.requests) - len(self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.requests) or bool(self._release_finished) or bool(self._release_preempted)

    @property
    def mean_batch_s(self) -> float:
        return self.estimator.mean_s

    def kv_used_fraction(self) -> float:
        return self.allocator.used_fraction()

    def outstanding_tokens(self) -> int:
        """Uncomputed prompt tokens + remaining decode tokens (routing's work measure)."""
        return sum(r.num_outstanding_tokens for r in self.requests.values())

    def drain_events(self) -> list[LifecycleEvent]:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ inputs
    def add(self, req: Request, now: float) -> TokenEvent | None:
        """Queue a new request. Returns a finish event if it can never run."""
        if req.req_id in self.requests:
            raise ValueError(f"duplicate request id {req.req_id!r}")
        if req.status != RequestStatus.WAITING or req.num_computed_tokens or req.num_output_tokens:
            raise ValueError(f"request {req.req_id!r} is not fresh")
        req.seq = next(self._seq)
        self._event(EventKind.QUEUED, req, now)
        if req.num_prompt_tokens + req.max_tokens > self.config.max_model_len:
            req.status = RequestStatus.FINISHED_IGNORED
            req.finished_s = now
            self._event(EventKind.FINISHED, req, now, "ignored")
            return TokenEvent(req_id=req.req_id, finish_reason="ignored", time_s=now,
                              num_prompt_tokens=req.num_prompt_tokens)
        if self.prefix_cache is not None and req.prompt_token_ids is not None:
            self.match_prefix(req)  # policies see the cached prefix as computed from the start
        self.requests[req.req_id] = req
        self.num_waiting_tokens += req.num_uncomputed_tokens
        self.policy.on_arrival(req, now)
        return None

    def abort(self, req_id: str, now: float) -> TokenEvent | None:
        """Cancel a request; its KV is freed now and the runner told in the next plan."""
        req = self.requests.get(req_id)
        if req is None:
            return None
        self.finish(req, RequestStatus.FINISHED_ABORTED, now)
        return TokenEvent(req_id=req_id, finish_reason="abort", time_s=now, num_prompt_tokens=req.num_prompt_tokens,
                          num_output_tokens=req.num_output_tokens - req.num_pending_outputs)

    def take_back_all(self, now: float) -> list[Request]:
        """Remove every unfinished request (executor lost) and return them, reset.

        Each comes back fresh (no progress kept: the KV is gone with the executor),
        ready to be ``add``-ed to another core. Output tokens already streamed are
        kept in ``output_token_ids`` / ``num_output_tokens`` so the caller can
        resubmit the remainder.
        """
        taken = list(self.requests.values())
        for req in taken:
            self.allocator.free(req.req_id)
            self.policy.on_remove(req)
        if self.prefix_cache is not None:
            self.prefix_cache.reset()  # the cached KV went with the executor
        if self._advanced is not None:  # finished by length ahead of a result that never came
            taken += [r for r in self._advanced[1]
                      if r.status == RequestStatus.FINISHED_LENGTH and r.num_pending_outputs]
        for req in taken:  # outputs whose ids never arrived are not outputs
            req.num_output_tokens -= req.num_pending_outputs
            req.num_pending_outputs = 0
        self.requests.clear()
        self.running.clear()
        self.num_waiting_tokens = 0
        self._known_to_runner.clear()
        self._release_finished.clear()
        self._release_preempted.clear()
        self._rematched.clear()
        self._in_flight.clear()
        self._advanced = None
        return taken

    # ------------------------------------------------------------------ the two calls
    def schedule(self, now: float) -> BatchPlan:
        """Decide the next iteration's batch.

        With one plan in flight this schedules ahead (see the module docstring):
        the in-flight plan is advanced first and the new plan is decided for its
        expected start, the in-flight plan's expected end.
        """
        inflight = self._in_flight
        sent = now  # measuring starts here (or at the previous result, if later)
        if inflight:
            if len(inflight) > 1:
                raise RuntimeError("schedule() with two plans in flight: update() the oldest first")
            running, running_sent = inflight[0]
            # the running plan ends a mean step after it started: when it was sent, or when the plan before it
            # ended, if later (as update() times steps). NOTE: not its own decision's expected start plus a mean
            # step: chained from plan to plan, that drifts ahead of the clock whenever steps run shorter than the
            # mean, and deadlines set at a drifted time come due late (docs/results.md, *Live agreement*)
            last = self._last_result_s
            expected_end = (running_sent if last is None or last < running_sent else last) + self.estimator.mean_s
            if self._advanced is None:
                self._advance(running, expected_end)
            now = max(now, expected_end)
        builder = BatchBuilder(self, now)
        self.policy.schedule(builder, now)
        if self.prefix_cache is not None:
            self.prefix_cache.commit()  # blocks this plan computes: hits from the next plan on
        new = builder.new
        if new:
            self._known_to_runner.update([s.req_id for s in new])
        # NOTE: built once per step: positionally, the stats with tuple.__new__ (skips the NamedTuple's
        # Python-level __new__; every field in order), the id lists only when there are some
        n_dec, n_crit, n_running = builder.num_decodes, builder.num_critical, len(self.running)
        stats = tuple.__new__(PlanStats, (
            builder.num_prefill_tokens, n_dec, n_crit, n_dec - n_crit, builder.num_preempted,
            self.allocator.used_fraction(), builder.offset, len(self.requests) - n_running, n_running,
            builder.num_cache_queries, builder.num_cache_hits))
        fin, pre = self._release_finished, self._release_preempted
        plan = BatchPlan(next(self._step_ids), tuple(new), tuple(builder.cached), tuple(fin) if fin else (),
                         tuple(pre) if pre else (), stats)
        if fin:
            self._release_finished = []
        if pre:
            self._release_preempted = []
        inflight.append((plan, sent))
        return plan

    def update(self, plan: BatchPlan, result: StepResult, now: float) -> list[TokenEvent]:
        """Apply a step's result: advance counters, record tokens, finish requests.

        Results are applied in the order plans were scheduled. A plan scheduled
        ahead that carries nothing (no work, no ids to release) need not be sent:
        ``update`` with an empty result withdraws it.
        """
        inflight = self._in_flight
        if len(inflight) == 2 and plan is inflight[1][0] and plan.is_empty and not (
                plan.finished_ids or plan.preempted_ids):
            inflight.pop()
            return []
        if not inflight or plan is not inflight[0][0]:
            raise RuntimeError("update() for a plan that is not the oldest in flight")
        if result.step_id != plan.step_id:
            raise ValueError(f"result for step {result.step_id}, expected {plan.step_id}")
        _, sent = inflight.popleft()
        empty = not plan.new and not plan.cached  # plan.is_empty, once
        if not empty:
            # the step started when it was scheduled, or when the plan before it ended
            last = self._last_result_s
            self.last_step_s = step_s = now - (sent if last is None or last < sent else last)
            st = plan.stats
            self.last_step_tokens = st.num_prefill_tokens + st.num_decodes  # = plan.num_tokens, without the sum
            self.last_step_plan = plan
            self.estimator.observe(step_s)
            self.num_steps += 1
        self._last_result_s = now
        advanced = self._advanced
        if advanced is not None and advanced[0] is plan:
            self._advanced = None
            return self._confirm(advanced[1], result, now)
        if not empty:
            self.last_batch_end_s = now
        # tokens by position: a result lists its ids in the plan's sampling order (the executor's and the
        # simulator's), so the k-th sampling slice's token is the k-th; a dict only for a result that does not
        rids, toks = result.req_ids, result.token_ids
        n_res, k = len(rids), 0
        sampled: dict[str, int] | None = None
        events: list[TokenEvent] = []
        served: list[Request] = []
        requests, running, on_token = self.requests, RequestStatus.RUNNING, self._on_token
        add_event, add_served, tnew = events.append, served.append, tuple.__new__
        n_prefilling = 0  # served requests whose prompt is still partial (a sampled one decodes now)
        # slices by index, as CachedRequestSlice lays them out: s[0] req_id, s[3] num_new_tokens, s[5] sample
        # (a NamedTuple's index is cheaper than its field name); new slices, if any, first and in that layout
        new = plan.new
        slices = plan.cached if not new else [
            (s.req_id, (), 0, s.num_new_tokens, False, s.sample) for s in new] + list(plan.cached)
        for s in slices:
            rid = s[0]
            req = requests.get(rid)
            if req is None or req.status is not running:
                if s[5] and k < n_res and rids[k] == rid:
                    k += 1
                continue  # aborted while the step ran: its token (if any) is dropped
            if not s[5]:
                computed = req.num_computed_tokens = req.num_computed_tokens + s[3]
                out = req.num_output_tokens
                if not (out > 0 and req.num_prompt_tokens + out - computed == 1):  # not ``req.is_decode``
                    n_prefilling += 1
            else:  # a sampled token sets num_computed_tokens itself (prompt + outputs - 1)
                if k < n_res and rids[k] == rid:
                    token = toks[k]
                    k += 1
                else:
                    if sampled is None:
                        sampled = dict(zip(rids, toks))
                    token = sampled.get(rid)
                    if token is None:
                        raise ValueError(f"step {plan.step_id}: no token sampled for {rid!r}")
                # NOTE: the hot path (once per decode per step): a token that is neither the first
                # nor the last is ``_on_token`` inlined, without its lifecycle events (it has none)
                last = req.last_token_s
                n_out = req.num_output_tokens + 1
                stops = req.sampling.stop_token_ids
                if (last is None or n_out >= req.max_tokens
                        or (stops and not req.sampling.ignore_eos and token in stops)):
                    add_event(on_token(req, token, now))
                    if req.status is not running:
                        continue  # finished by this token
                    add_served(req)
                    continue
                req.last_token_s = now
                if req.prompt_token_ids is not None:
                    req.output_token_ids.append(token)
                req.num_output_tokens = n_out
                n_prompt = req.num_prompt_tokens
                req.num_computed_tokens = n_prompt + n_out - 1  # the new token has no KV yet
                # a TokenEvent, positionally (tuple.__new__ skips the NamedTuple's Python-level __new__ and
                # its defaults: every field must be here, logprobs (None) last; _with_logprobs fills it)
                add_event(tnew(TokenEvent, (rid, (token,), None, now, False, n_prompt, n_out, None, now - last,
                                               None)))
            add_served(req)
        self.last_served_prefilling = n_prefilling
        self.policy.on_step_end(served, now)
        if result.logprobs:
            return _with_logprobs(events, result)
        return events

    # ------------------------------------------------------------------ pipelining
    @property
    def num_in_flight(self) -> int:
        """Plans scheduled and not yet updated (0, 1, or 2 when scheduling ahead)."""
        return len(self._in_flight)

    def _advance(self, plan: BatchPlan, end: float) -> None:
        """Apply ``plan`` as if it ran as planned, before its result (scheduling ahead).

        Mirrors ``update`` without token ids: each sampling slice counts one pending
        output; a request that reaches ``max_tokens`` is finished now (its KV release
        rides in the plan being built; its last token and FINISHED event come with
        the result). ``end``: when the plan is expected to finish.
        """
        requests, running = self.requests, RequestStatus.RUNNING
        served: list[Request] = []
        sampling: list[Request] = []
        for slices in (plan.new, plan.cached):
            for s in slices:
                req = requests.get(s.req_id)
                if req is None or req.status != running:
                    continue  # aborted since it was scheduled
                req.num_computed_tokens += s.num_new_tokens
                if s.sample:
                    n_out = req.num_output_tokens = req.num_output_tokens + 1
                    req.num_pending_outputs += 1
                    req.num_computed_tokens = req.num_prompt_tokens + n_out - 1
                    sampling.append(req)
                    if n_out >= req.max_tokens:
                        self.finish(req, RequestStatus.FINISHED_LENGTH, end, record=False)
                        continue
                served.append(req)
        self._advanced = (plan, sampling)
        if not plan.is_empty:
            self.last_batch_end_s = end
        self.last_served_prefilling = None  # (not counted on this path)
        self.policy.on_step_end(served, end)

    def _confirm(self, sampling: list[Request], result: StepResult, now: float) -> list[TokenEvent]:
        """The result of an advanced plan: token ids, timestamps, stop tokens."""
        sampled = dict(zip(result.req_ids, result.token_ids))
        events: list[TokenEvent] = []
        for req in sampling:
            if not req.num_pending_outputs:
                continue  # aborted (or taken back) since: its token is dropped
            if req.status == RequestStatus.FINISHED_ABORTED:
                continue
            token = sampled.get(req.req_id)
            if token is None:
                raise ValueError(f"step {result.step_id}: no token sampled for {req.req_id!r}")
            req.num_pending_outputs -= 1
            events.append(self._on_token(req, token, now, advanced=True))
        if result.logprobs:
            return _with_logprobs(events, result)
        return events

    # ------------------------------------------------------------------ mechanism used by BatchBuilder
    def match_prefix(self, req: Request) -> list[int]:
        """Look up a waiting request's cached prefix; its ``num_computed_tokens`` becomes the
        cached length (what every policy then sees as done). Returns the blocks holding it."""
        hits = self.prefix_cache.match(req)
        computed = len(hits) * self.prefix_cache.block_size
        if req.status != RequestStatus.WAITING and req.status != RequestStatus.PREEMPTED:
            raise ValueError(f"prefix lookup for {req.req_id!r} in state {req.status.name}")
        if computed != req.num_computed_tokens and req.req_id in self.requests:  # (add() looks up before)
            self.num_waiting_tokens -= computed - req.num_computed_tokens
            self._rematched.add(req.req_id)
        req.num_computed_tokens = computed
        return hits

    def take_rematched_ids(self) -> list[str]:
        """Waiting requests whose cached prefix (so their outstanding work) changed since the last
        call, without being scheduled: a driver keeping work incrementally re-measures them."""
        ids, self._rematched = list(self._rematched), set()
        return ids

    def on_admitted(self, req: Request, now: float) -> None:
        req.status = RequestStatus.RUNNING
        self.running[req.req_id] = req
        self.num_waiting_tokens -= req.num_uncomputed_tokens
        if req.first_scheduled_s is None:
            req.first_scheduled_s = now
        self._event(EventKind.SCHEDULED, req, now)

    def preempt(self, req: Request, now: float) -> None:
        if req.status != RequestStatus.RUNNING:
            raise ValueError(f"cannot preempt {req.req_id!r} in state {req.status.name}")
        self.allocator.free(req.req_id)
        del self.running[req.req_id]
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.num_waiting_tokens += req.num_tokens
        if req.req_id in self._known_to_runner:
            self._known_to_runner.discard(req.req_id)
            self._release_preempted.append(req.req_id)
        self._event(EventKind.PREEMPTED, req, now)
        self.policy.on_preempt(req, now)

    def finish(self, req: Request, status: RequestStatus, now: float, record: bool = True) -> None:
        """Free ``req``'s KV, drop it from every queue, release it on the runner.

        ``record=False`` leaves the FINISHED lifecycle event to the caller (a
        length finish decided ahead of its step's result records it with the token).
        """
        if not status.is_finished:
            raise ValueError(f"{status.name} is not a finished state")
        if req.status == RequestStatus.RUNNING:
            self.allocator.free(req.req_id)
            del self.running[req.req_id]
        else:
            self.num_waiting_tokens -= req.num_uncomputed_tokens
        req.status = status
        req.finished_s = now
        self.requests.pop(req.req_id, None)
        if self._rematched:  # (nobody may drain it, e.g. the simulator: keep it bounded)
            self._rematched.discard(req.req_id)
        self.policy.on_remove(req)
        if req.req_id in self._known_to_runner:
            self._known_to_runner.discard(req.req_id)
            self._release_finished.append(req.req_id)
        if record:
            self._event(EventKind.FINISHED, req, now, FINISH_REASONS[status])

    # ------------------------------------------------------------------ internals
    def _on_token(self, req: Request, token_id: int, now: float, advanced: bool = False) -> TokenEvent:
        """Record one sampled token. ``advanced``: its step was advanced, so the token is
        already counted (and a length finish already applied, without its event)."""
        last = req.last_token_s
        if last is None:
            req.first_token_s = now
            self._event(EventKind.FIRST_TOKEN, req, now)
        req.last_token_s = now
        if req.prompt_token_ids is not None:
            req.output_token_ids.append(token_id)
        if advanced:
            n_out = req.num_output_tokens
        else:
            n_out = req.num_output_tokens = req.num_output_tokens + 1
            req.num_computed_tokens = req.num_prompt_tokens + n_out - 1  # the new token has no KV yet
        reason = None
        sampling = req.sampling
        if sampling.stop_token_ids and not sampling.ignore_eos and token_id in sampling.stop_token_ids:
            if req.status == RequestStatus.FINISHED_LENGTH:  # finished ahead; the token says why
                req.status = RequestStatus.FINISHED_STOPPED
                req.finished_s = now
                self._event(EventKind.FINISHED, req, now, "stop")
            else:
                self.finish(req, RequestStatus.FINISHED_STOPPED, now)
            reason = "stop"
        elif n_out >= req.max_tokens:
            if req.status == RequestStatus.FINISHED_LENGTH:  # finished ahead: only the event is left
                req.finished_s = now
                self._event(EventKind.FINISHED, req, now, "length")
            else:
                self.finish(req, RequestStatus.FINISHED_LENGTH, now)
            reason = "length"
        # positional: (req_id, token_ids, finish_reason, time_s, is_first, num_prompt_tokens,
        #              num_output_tokens, ttft_s, tbt_s)
        if last is None:
            return TokenEvent(req.req_id, (token_id,), reason, now, True, req.num_prompt_tokens, n_out,
                              now - req.arrival_s, None)
        return TokenEvent(req.req_id, (token_id,), reason, now, False, req.num_prompt_tokens, n_out, None, now - last)

    def _event(self, kind: EventKind, req: Request, now: float, detail: str = "") -> None:
        if self._record_events:
            self._events.append(LifecycleEvent(kind, req.req_id, now, detail))


def _with_logprobs(events: list[TokenEvent], result: StepResult) -> list[TokenEvent]:
    """Attach the executor's logprobs (opaque values, docs/gateway.md) to their tokens' events.

    Only for a result that carries some; an event holds one token, so its value is a 1-tuple.
    """
    lps = {rid: lp for rid, lp in zip(result.req_ids, result.logprobs) if lp is not None}
    if not lps:
        return events
    return [ev._replace(logprobs=(lps[ev.req_id],)) if ev.req_id in lps and ev.token_ids else ev for ev in events]

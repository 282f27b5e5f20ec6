"""FakeRunner: the Runner interface without a model (and without torch).

Tokens are a pure function of (request id, token position), so tests and the
simulator-vs-service parity check get the same tokens whatever the batching:

    token = (sum(req_id.encode()) + position) % vocab_size

where ``position`` is the index of the sampled token in its sequence. Plans are
validated by the same ``RequestCache`` checks as ``ModelRunner`` (unknown or
duplicate ids, chunks past the end, computed-token mismatches, and block checks
when ``num_blocks`` is given), so a scheduler bug surfaces with either runner.

An optional ``cost(plan) -> seconds`` makes each step take that long (it sleeps),
so timings look like a real step. The whole step, its own bookkeeping included, is
held to the cost: it sleeps until ``start + cost`` less what the step's tail (sampling,
committing, the sleep's own overshoot) took recently. A live stack that emulates a
GPU with this runner then runs the cost model's steps, not the cost plus this
process's Python (docs/results.md, "Live agreement").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from contract.executor_info import FAKE_MODEL, ExecutorInfo
from contract.logprobs import SampleLogprobs, TokenLogprob
from contract.plan import BatchPlan, StepResult
from executor_svc.request_cache import RequestCache


def fake_token(req_id: str, position: int, vocab_size: int) -> int:
    """The token FakeRunner samples for ``req_id`` at sequence index ``position``."""
    return (sum(req_id.encode()) + position) % vocab_size


class FakeRunner:
    """Deterministic stand-in for :class:`executor_svc.runner.ModelRunner`.

    Args:
        vocab_size: tokens are in ``[0, vocab_size)``.
        cost: optional ``plan -> seconds``; the step sleeps that long.
        sleep: False reports ``cost`` as forward time without sleeping (virtual clocks).
        num_blocks: enables block-id range checks; None skips them.
        check_blocks: check that a request's blocks cover its tokens (False when
            plans carry no block ids).
        max_model_len: longest sequence accepted (0 = unlimited).
        avoid_token_ids: never emit these (e.g. EOS, so outputs run to max_tokens);
            an avoided token is replaced by the next id.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 32000,
        cost: Callable[[BatchPlan], float] | None = None,
        sleep: bool = True,
        block_size: int = 16,
        num_blocks: int | None = None,
        check_blocks: bool = False,
        max_model_len: int = 0,
        eos_token_ids: tuple[int, ...] = (2,),
        avoid_token_ids: Iterable[int] = (),
    ) -> None:
        self.vocab_size = vocab_size
        self.cost = cost
        self.sleep = sleep
        self._tail_ns = 0.0  # EWMA of what a step spends after its sleep's deadline (tail work + overshoot)
        self.eos_token_ids = eos_token_ids
        self.avoid = frozenset(avoid_token_ids)
        self.requests = RequestCache(
            block_size=block_size, num_blocks=num_blocks, max_model_len=max_model_len or None,
            require_token_ids=False, check_blocks=check_blocks,
        )
        self._info = ExecutorInfo(
            model=FAKE_MODEL, device="cpu", dtype="none", attention_backend="fake", block_size=block_size,
            num_blocks=num_blocks or 0, max_model_len=max_model_len, vocab_size=vocab_size,
            eos_token_ids=eos_token_ids,
        )

    def info(self) -> ExecutorInfo:
        return self._info

    def release(self, req_ids: Iterable[str]) -> None:
        self.requests.release(req_ids)

    def token_for(self, req_id: str, position: int) -> int:
        tok = fake_token(req_id, position, self.vocab_size)
        while tok in self.avoid:
            tok = (tok + 1) % self.vocab_size
        return tok

    def execute(self, plan: BatchPlan) -> StepResult:
        t0 = time.perf_counter_ns()
        self.requests.check(plan)
        chunks = self.requests.apply(plan)
        t1 = time.perf_counter_ns()
        forward_ns = 0
        wake_ns = None
        if chunks and self.cost is not None:
            seconds = max(0.0, float(self.cost(plan)))
            forward_ns = int(seconds * 1e9)
            if self.sleep and seconds > 0:
                wake_ns = t0 + forward_ns - self._tail_ns
                left_ns = wake_ns - time.perf_counter_ns()
                if left_ns > 0:
                    time.sleep(left_ns / 1e9)
        t2 = time.perf_counter_ns()
        sampled = {c.state.req_id: self.token_for(c.state.req_id, c.state.num_tokens) for c in chunks if c.sample}
        logprobs = self._logprobs(chunks, sampled) if self.requests.num_with_extras else {}
        RequestCache.commit(chunks, sampled)
        req_ids = tuple(c.state.req_id for c in chunks if c.sample)
        t3 = time.perf_counter_ns()
        prepare_ns, sample_ns = t1 - t0, t3 - t2
        if wake_ns is not None:  # learn the tail: the step should have ended at t0 + cost
            self._tail_ns += 0.2 * (max(0, t3 - wake_ns) - self._tail_ns)
        if self.sleep:
            forward_ns = t2 - t1
        # without sleeping, the cost stands in for the forward (virtual clocks)
        return StepResult(
            step_id=plan.step_id, req_ids=req_ids, token_ids=tuple(sampled[r] for r in req_ids),
            prepare_ns=prepare_ns, forward_ns=forward_ns, sample_ns=sample_ns,
            total_ns=prepare_ns + forward_ns + sample_ns,
            logprobs=tuple(logprobs.get(r) for r in req_ids) if logprobs else (),
        )

    def _logprobs(self, chunks, sampled: dict[str, int]) -> dict[str, SampleLogprobs]:
        """Made-up but well-formed logprobs for the requests that ask (-1 per generated token, -0.5 per
        prompt token; the sampled token first among its alternatives), sent the way ModelRunner sends them."""
        out = {}
        for c in chunks:
            st = c.state
            if not (c.sample and st.has_extras):
                continue
            k = st.sampling.logprobs
            tok = None
            if k is not None:
                t = sampled[st.req_id]
                tok = TokenLogprob(t, -1.0, tuple((t + i) % self.vocab_size for i in range(k)), (-1.0,) * k)
            prompt = None
            if st.prompt_logprobs is not None:
                prompt = tuple(TokenLogprob(t, -0.5) for t in st.token_ids[1:st.num_prompt_tokens])
                st.prompt_logprobs = None
            if tok is not None or prompt is not None:
                out[st.req_id] = SampleLogprobs(tok, prompt)
        return out

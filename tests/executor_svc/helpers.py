"""A miniature scheduler that drives a runner with hand-made plans, plus HF references.

Importable without torch (FakeRunner tests use ``Driver`` too).

``Driver`` allocates blocks, chunks prefills, mixes decodes, finishes and
preempts requests, and builds exactly the plan values the real scheduling core
would send (new slices once, then deltas). It decides nothing clever: tests
control arrivals, chunk sizes and preemptions explicitly.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field

from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice, StepResult
from contract.sampling import SamplingParams

PROMPT_LENGTHS = (5, 17, 40, 64)  # within one block, across blocks, several blocks
MAX_NEW = 8


@dataclass
class _Req:
    rid: str
    tokens: list[int]  # prompt + outputs
    max_new: int
    sampling: SamplingParams
    outputs: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    sent: bool = False


class Driver:
    """Drive ``runner`` step by step. ``shuffle_blocks`` scrambles block placement."""

    def __init__(self, runner, num_blocks: int, block_size: int = 16, shuffle_blocks: int | None = None) -> None:
        self.runner = runner
        self.block_size = block_size
        self.free = list(range(num_blocks))
        if shuffle_blocks is not None:
            random.Random(shuffle_blocks).shuffle(self.free)
        self.free.reverse()  # pop() from the end takes the first block
        self.reqs: dict[str, _Req] = {}
        self.done: dict[str, list[int]] = {}
        self._finished: list[str] = []
        self._preempted: list[str] = []
        self.step_id = 0
        self.logprobs: dict[str, list] = {}  # request id -> the SampleLogprobs its tokens reported, in order

    def add(self, rid: str, prompt: list[int], max_new: int, sampling: SamplingParams | None = None) -> None:
        self.reqs[rid] = _Req(rid, list(prompt), max_new, sampling or SamplingParams())

    def preempt(self, rid: str) -> None:
        """Recompute preemption: free KV; the request returns as new with prompt + outputs."""
        r = self.reqs[rid]
        self.free.extend(reversed(r.blocks))
        r.blocks, r.computed, r.sent = [], 0, False
        self._preempted.append(rid)

    def _alloc(self, r: _Req, num_tokens: int) -> list[int]:
        need = -(-num_tokens // self.block_size) - len(r.blocks)
        new = [self.free.pop() for _ in range(max(0, need))]
        r.blocks.extend(new)
        return new

    def plan(self, chunk: int | None = None, only: set[str] | None = None) -> BatchPlan:
        new, cached = [], []
        for r in self.reqs.values():
            if only is not None and r.rid not in only:
                continue
            remaining = len(r.tokens) - r.computed
            n = remaining if chunk is None else min(chunk, remaining)
            end = r.computed + n
            sample = end == len(r.tokens)
            if not r.sent:
                self._alloc(r, len(r.tokens))
                new.append(NewRequestSlice(
                    req_id=r.rid, token_ids=tuple(r.tokens), num_tokens=len(r.tokens), sampling=r.sampling,
                    block_ids=tuple(r.blocks), num_computed_tokens=0, num_new_tokens=n, sample=sample,
                    num_prompt_tokens=len(r.tokens) - len(r.outputs)))
            else:
                added = self._alloc(r, end)
                cached.append(CachedRequestSlice(
                    req_id=r.rid, new_block_ids=tuple(added), num_computed_tokens=r.computed, num_new_tokens=n,
                    is_decode=remaining == 1 and bool(r.outputs), sample=sample))
        plan = BatchPlan(step_id=self.step_id, new=tuple(new), cached=tuple(cached),
                         finished_ids=tuple(self._finished), preempted_ids=tuple(self._preempted))
        return plan

    def commit(self, plan: BatchPlan, result: StepResult) -> None:
        self._finished, self._preempted = [], []
        self.step_id += 1
        for s in plan.new:
            r = self.reqs[s.req_id]
            r.sent, r.computed = True, s.num_new_tokens
        for c in plan.cached:
            self.reqs[c.req_id].computed += c.num_new_tokens
        for i, (rid, tok) in enumerate(zip(result.req_ids, result.token_ids)):
            if result.logprobs and result.logprobs[i] is not None:
                self.logprobs.setdefault(rid, []).append(result.logprobs[i])
            r = self.reqs[rid]
            r.outputs.append(tok)
            r.tokens.append(tok)
            if len(r.outputs) >= r.max_new:
                self.free.extend(reversed(r.blocks))
                self.done[rid] = r.outputs
                del self.reqs[rid]
                self._finished.append(rid)

    def step(self, chunk: int | None = None, only: set[str] | None = None) -> StepResult:
        plan = self.plan(chunk, only)
        result = self.runner.execute(plan)
        assert result.req_ids == plan.sampling_ids()
        self.commit(plan, result)
        return result

    def run(self, chunk: int | None = None, max_steps: int = 1000) -> dict[str, list[int]]:
        for _ in range(max_steps):
            if not self.reqs:
                break
            self.step(chunk)
        return self.done


@contextlib.contextmanager
def sdpa_attention(model):
    """Temporarily switch a model back to stock SDPA (for ``generate`` references)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """Reference: ``model.generate`` greedy on one unpadded prompt.

    May stop early at EOS (the runner never does; the scheduler handles stops), so
    compare with :func:`same_prefix`.
    """
    import torch

    ids = torch.tensor([prompt], device=model.device)
    with sdpa_attention(model), torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_prompt(seed: int, length: int, vocab: int = 32000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def same_prefix(ours: list[int], ref: list[int]) -> bool:
    """``ours`` continues exactly like the (possibly EOS-shortened) reference."""
    return len(ref) > 0 and ours[: len(ref)] == ref

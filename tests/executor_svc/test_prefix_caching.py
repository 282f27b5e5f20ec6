"""Prefix caching end to end: the scheduler's core shares KV blocks, the real runner computes only the rest.

The core (prefix caching on or off) drives a ``ModelRunner`` in process; requests
sharing a long prefix must get the same greedy tokens either way, while the cached
run sends new requests with ``num_computed_tokens > 0``. Also the executor's
contract checks for shared blocks (torch-free, through ``FakeRunner``).
"""

from __future__ import annotations

import pytest

from contract.plan import BatchPlan, NewRequestSlice
from executor_svc import models
from executor_svc.fake_runner import FakeRunner
from executor_svc.runner_api import PlanError
from scheduler_svc.core import Request, SchedulerConfig, make_core
from tests.executor_svc.helpers import random_prompt

SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence, "
          "be polite, never invent tracking numbers, and mention the help desk at the end. "
          "Customers write in English; keep answers under twenty words and avoid lists.")
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?"]


def drive(core, runner, arrivals: list[tuple[int, Request]], max_steps: int = 500):
    """schedule -> execute -> update; ``arrivals``: (step number, request). Returns outputs and plans."""
    plans: list[BatchPlan] = []
    pending = sorted(arrivals, key=lambda a: a[0])
    reqs = [r for _, r in arrivals]
    now = 0.0
    for step in range(max_steps):
        while pending and pending[0][0] <= step:
            assert core.add(pending.pop(0)[1], now) is None
        if not pending and not core.requests:
            break
        plan = core.schedule(now)
        now += 0.01
        core.update(plan, runner.execute(plan), now)
        plans.append(plan)
        if core.prefix_cache is not None:
            core.prefix_cache.check_invariants()
    else:
        raise AssertionError("requests never finished")
    return {r.req_id: list(r.output_token_ids) for r in reqs}, plans


@pytest.fixture(scope="module")
def smol():
    try:
        models.ensure_default_model()
    except Exception as exc:  # noqa: BLE001 - any failure to fetch means "not available here"
        pytest.skip(f"SmolLM2 not available: {exc}")
    loaded = models.load_model("default")
    return loaded, models.load_tokenizer(loaded)


def _arrivals(tok, max_new: int) -> list[tuple[int, Request]]:
    out = []
    for i, q in enumerate(QUESTIONS):
        text = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tuple(tok(text)["input_ids"])
        # q0 first; q1 once q0's prompt is cached; q2 together with q1 (hits the same blocks)
        out.append((0 if i == 0 else 3, Request(f"q{i}", len(ids), max_new, 0.0, prompt_token_ids=ids)))
    return out


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_with_and_without_prefix_caching(smol, monkeypatch):
    from executor_svc import attention
    from executor_svc.runner import ModelRunner

    loaded, tok = smol
    cascades: list[int] = []
    real = attention._cascade
    monkeypatch.setattr(attention, "_cascade", lambda *a, **k: cascades.append(1) or real(*a, **k))
    outs = {}
    for on in (False, True):
        cfg = SchedulerConfig(enable_prefix_caching=on, token_budget=64, max_model_len=2048)
        core = make_core("sarathi-fcfs", num_blocks=64, config=cfg)
        arrivals = _arrivals(tok, 8)
        # cascade_min_saved_tokens=0: decodes sharing the system prompt's blocks take the cascade path
        # (executor_svc/attention.py, torch's ops; the C++ decode kernel needs none), which must give
        # the uncached run's tokens too
        runner = ModelRunner(loaded, num_blocks=64, cascade_min_saved_tokens=0, cpu_kernels=False)
        outs[on], plans = drive(core, runner, arrivals)
        cached = [s.num_computed_tokens for p in plans for s in p.new if s.num_computed_tokens]
        if on:
            # q1 and q2 reuse the full blocks of the prompt they share with q0 (the system prompt)
            a, b = arrivals[0][1].prompt_token_ids, arrivals[1][1].prompt_token_ids
            common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            assert common >= 48 and cached == [common // 16 * 16] * 2, (common, cached)
            assert core.prefix_cache.num_hit_tokens == sum(cached)
            assert cascades  # the shared blocks were read once per group
        else:
            assert not cached and not cascades
    assert outs[True] == outs[False]
    assert "Paris" in tok.decode(outs[True]["q0"])


def test_tiny_model_cached_prefix_equals_full_prefill(make_runner):
    """Same check on the tiny random model: b shares a's first four blocks, its own tail crosses a block."""
    base = random_prompt(7, 70)
    arrivals = [(0, Request("a", 70, 6, 0.0, prompt_token_ids=tuple(base))),
                (2, Request("b", 75, 6, 0.0, prompt_token_ids=tuple(base[:64] + random_prompt(8, 11))))]
    outs = {}
    for on in (False, True):
        cfg = SchedulerConfig(enable_prefix_caching=on, token_budget=32, max_model_len=512)
        core = make_core("sarathi-fcfs", num_blocks=16, config=cfg)
        runner = make_runner(num_blocks=16)
        fresh = [(s, Request(r.req_id, r.num_prompt_tokens, r.max_tokens, 0.0, prompt_token_ids=r.prompt_token_ids))
                 for s, r in arrivals]
        outs[on], plans = drive(core, runner, fresh)
        if on:
            assert any(s.num_computed_tokens == 64 for p in plans for s in p.new if s.req_id == "b")
    assert outs[True] == outs[False]


# ---------------------------------------------------------------- the executor's contract (torch-free)
def _new(rid, n, blocks, computed, new):
    return NewRequestSlice(req_id=rid, token_ids=tuple(range(n)), num_tokens=n, block_ids=tuple(blocks),
                           num_computed_tokens=computed, num_new_tokens=new, sample=computed + new == n)


def test_executor_accepts_a_cached_prefix_and_rejects_writes_into_shared_blocks():
    runner = FakeRunner(num_blocks=8, block_size=16, check_blocks=True)
    runner.execute(BatchPlan(step_id=1, new=(_new("a", 40, [0, 1, 2], 0, 40),)))
    # b shares a's two full blocks and computes its own third block
    runner.execute(BatchPlan(step_id=2, new=(_new("b", 36, [0, 1, 3], 32, 4),)))
    # c would write into block 1, which a and b hold
    with pytest.raises(PlanError, match="already belongs"):
        runner.execute(BatchPlan(step_id=3, new=(_new("c", 20, [4, 1], 0, 20),)))
    # a cached prefix must be whole blocks, below the sequence's end
    with pytest.raises(PlanError, match="multiple of the block size"):
        runner.execute(BatchPlan(step_id=3, new=(_new("d", 36, [0, 1, 5], 20, 16),)))
    with pytest.raises(PlanError, match="multiple of the block size"):
        runner.execute(BatchPlan(step_id=3, new=(_new("d", 32, [0, 1], 32, 1),)))
    # a block written by one request in this step cannot be another's cached prefix
    with pytest.raises(PlanError, match="same step"):
        runner.execute(BatchPlan(step_id=3, new=(_new("e", 20, [6, 7], 0, 20), _new("f", 20, [6, 5], 16, 4))))
    # once a and b are released, block 1 is free to be written again
    runner.execute(BatchPlan(step_id=3, finished_ids=("a", "b"), new=(_new("c", 20, [4, 1], 0, 20),)))

"""Bad plans are rejected with PlanError before any KV or state changes."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice
from executor_svc.runner_api import PlanError
from tests.executor_svc.helpers import MAX_NEW, Driver, same_prefix


def _new(rid: str, tokens, blocks, n=None, **kw) -> NewRequestSlice:
    n = len(tokens) if n is None else n
    return NewRequestSlice(req_id=rid, token_ids=tuple(tokens), num_tokens=len(tokens), block_ids=tuple(blocks),
                           num_new_tokens=n, sample=n == len(tokens), **kw)


# defect -> a fragment of the PlanError message that names it
EXPECTED = {
    "unknown cached id": "unknown request 'ghost'",
    "block out of range": "out of range",
    "negative block": "out of range",
    "chunk past end (new)": "past the end",
    "chunk past end (cached)": "past the end",
    "computed mismatch": "computed tokens",
    "duplicate new id": "appears twice",
    "new id already active": "already active",
    "id both new and cached": "appears twice",
    "too few blocks": "KV blocks hold",
    "block owned by another request": "already belongs to 'good'",
    "same block twice": "already belongs to 'n1'",
    "sample before end": "sample=True",
    "no token ids": "no token ids",
    "zero tokens": "must be >= 1",
    "nonzero computed on new": "must be a multiple of the block size",
}


def _bad_plans(drv: Driver, good: BatchPlan) -> dict[str, BatchPlan]:
    """Each plan contains the good request's real decode plus one defect."""
    dec = good.cached[0]
    rid = dec.req_id
    own_block = drv.reqs[rid].blocks[0]
    step = good.step_id
    ok_new = _new("n1", [5, 6, 7], [60])
    return {
        "unknown cached id": dataclasses.replace(good, cached=(dec, CachedRequestSlice(
            req_id="ghost", num_computed_tokens=3, num_new_tokens=1, is_decode=True, sample=True))),
        "block out of range": dataclasses.replace(good, new=(_new("n1", [5, 6, 7], [10_000]),)),
        "negative block": dataclasses.replace(good, new=(_new("n1", [5, 6, 7], [-1]),)),
        "chunk past end (new)": dataclasses.replace(good, new=(dataclasses.replace(ok_new, num_new_tokens=4),)),
        "chunk past end (cached)": dataclasses.replace(good, cached=(dec._replace(num_new_tokens=2, is_decode=False),)),
        "computed mismatch": dataclasses.replace(good, cached=(dec._replace(
            num_computed_tokens=dec.num_computed_tokens - 1),)),
        "duplicate new id": dataclasses.replace(good, new=(ok_new, _new("n1", [5, 6, 7], [61]))),
        "new id already active": dataclasses.replace(good, new=(_new(rid, [5, 6, 7], [61]),)),
        "id both new and cached": BatchPlan(step_id=step, new=(_new(rid, [5], [61]),), cached=(dec,),
                                            preempted_ids=(rid,)),
        "too few blocks": dataclasses.replace(good, new=(_new("n1", list(range(3, 40)), [60, 61]),)),
        "block owned by another request": dataclasses.replace(good, new=(_new("n1", [5, 6, 7], [own_block]),)),
        "same block twice": dataclasses.replace(good, new=(ok_new, _new("n2", [5, 6, 7], [60]))),
        "sample before end": dataclasses.replace(good, new=(dataclasses.replace(ok_new, num_new_tokens=2,
                                                                               sample=True),)),
        "no token ids": dataclasses.replace(good, new=(dataclasses.replace(ok_new, token_ids=()),)),
        "zero tokens": dataclasses.replace(good, new=(dataclasses.replace(ok_new, num_new_tokens=0, sample=False),)),
        "nonzero computed on new": dataclasses.replace(good, new=(dataclasses.replace(ok_new,
                                                                                     num_computed_tokens=1),)),
    }


def test_bad_plans_rejected_and_kv_untouched(make_runner, prompts, references):
    runner = make_runner(num_blocks=64)
    drv = Driver(runner, num_blocks=64)
    drv.add("good", prompts["p40"], MAX_NEW)
    drv.step()  # prefill + first token
    good = drv.plan()  # the next decode of "good"
    k0, v0 = runner.kv.k.clone(), runner.kv.v.clone()
    bad_plans = _bad_plans(drv, good)
    assert set(bad_plans) == set(EXPECTED)
    for name, bad in bad_plans.items():
        with pytest.raises(PlanError, match=re.escape(EXPECTED[name])):
            runner.execute(bad)
        assert torch.equal(runner.kv.k, k0) and torch.equal(runner.kv.v, v0), f"KV written by rejected plan: {name}"
        assert runner.requests.get("good").num_computed_tokens == good.cached[0].num_computed_tokens, name
        assert "n1" not in runner.requests, name
    # a rejected plan releases nothing either, not even its finished ids
    with pytest.raises(PlanError):
        runner.execute(dataclasses.replace(good, finished_ids=("good",)))
    assert "good" in runner.requests
    # the good request continues as if nothing happened
    drv.commit(good, runner.execute(good))
    done = drv.run()
    assert same_prefix(done["good"], references["p40"])


def test_plan_error_is_value_error():
    assert issubclass(PlanError, ValueError)


def test_empty_plan_releases(make_runner, prompts):
    runner = make_runner()
    drv = Driver(runner, num_blocks=64)
    drv.add("a", prompts["p5"], 3)
    drv.step()
    assert "a" in runner.requests
    result = runner.execute(BatchPlan(step_id=9, finished_ids=("a",)))
    assert result.req_ids == () and result.step_id == 9
    assert "a" not in runner.requests
    runner.release(["a", "never-seen"])  # idempotent, unknown ids ignored


def test_max_model_len_enforced(tiny):
    from executor_svc.runner import ModelRunner

    runner = ModelRunner(tiny, num_blocks=8, max_model_len=32)
    with pytest.raises(PlanError, match="max_model_len"):
        runner.execute(BatchPlan(new=(_new("a", list(range(3, 43)), [0, 1, 2]),)))

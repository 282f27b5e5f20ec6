"""BatchPlan and StepResult keep a dataclass's constructor behaviour with their faster ``__init__``
(contract/plan.py, ``_fast_init``; docs/results.md, *Simulator speed*)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from contract.plan import BatchPlan, CachedRequestSlice, PlanStats, StepResult


@pytest.mark.parametrize("cls", [BatchPlan, StepResult])
def test_signature_is_the_fields_in_order_with_their_defaults(cls):
    params = list(inspect.signature(cls).parameters.values())
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    made = cls()
    for f in fields:
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(made, f.name) == want, f.name


def test_positional_keyword_and_replace_agree():
    dec = CachedRequestSlice("r1", (), 7, 1, True, True)
    stats = PlanStats(num_decodes=1)
    a = BatchPlan(3, (), (dec,), ("f",), (), stats)
    b = BatchPlan(step_id=3, cached=(dec,), finished_ids=("f",), stats=stats)
    assert a == b
    assert dataclasses.replace(a, step_id=4).step_id == 4
    assert dataclasses.replace(a, step_id=4).cached == (dec,)
    r = StepResult(3, ("r1",), (5,))
    assert r == StepResult(step_id=3, req_ids=("r1",), token_ids=(5,))
    assert r.logprobs == () and r.total_ns == 0


def test_default_factory_gives_each_plan_its_own_value_and_instances_stay_frozen():
    p = BatchPlan()
    assert p.stats == PlanStats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.step_id = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        StepResult().req_ids = ("x",)
    with pytest.raises(TypeError):
        BatchPlan(no_such_field=1)

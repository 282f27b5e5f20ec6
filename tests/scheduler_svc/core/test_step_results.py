"""How ``update`` pairs a result's tokens with the plan's requests: by id, whatever order the result lists them in."""

from __future__ import annotations

import pytest

from contract.plan import StepResult
from tests.builders import core_with, make_request, step


def _decoding_core(n: int):
    reqs = [make_request(16, 8, token_ids=True) for _ in range(n)]
    core = core_with("sarathi-fcfs", *reqs)
    _, _, now = step(core, 0.0)  # every prompt in one step: each now decodes
    assert all(r.is_decode for r in reqs)
    return core, reqs, now


def _result(plan, order, token_of) -> StepResult:
    ids = [plan.sampling_ids()[i] for i in order]
    return StepResult(step_id=plan.step_id, req_ids=tuple(ids), token_ids=tuple(token_of[i] for i in ids))


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]], ids=["plan order", "reversed", "shuffled"])
def test_each_request_gets_its_own_token_in_any_result_order(order):
    core, reqs, now = _decoding_core(4)
    plan = core.schedule(now)
    token_of = {r.req_id: 100 + i for i, r in enumerate(reqs)}
    events = core.update(plan, _result(plan, order, token_of), now + 0.05)
    assert {e.req_id: e.token_ids for e in events} == {r.req_id: (token_of[r.req_id],) for r in reqs}
    assert all(r.output_token_ids[-1] == token_of[r.req_id] for r in reqs)


def test_a_request_aborted_while_its_step_ran_does_not_shift_the_others_tokens():
    core, reqs, now = _decoding_core(4)
    plan = core.schedule(now)
    core.abort(reqs[1].req_id, now + 0.01)
    token_of = {r.req_id: 100 + i for i, r in enumerate(reqs)}
    events = core.update(plan, _result(plan, [0, 1, 2, 3], token_of), now + 0.05)
    assert {e.req_id: e.token_ids[0] for e in events} == {r.req_id: token_of[r.req_id] for r in reqs if r is not reqs[1]}


def test_a_result_missing_a_sampling_request_is_refused_naming_it():
    core, _, now = _decoding_core(3)
    plan = core.schedule(now)
    ids = plan.sampling_ids()
    result = StepResult(step_id=plan.step_id, req_ids=ids[:1] + ids[2:], token_ids=(5, 5))
    with pytest.raises(ValueError, match=repr(ids[1])):
        core.update(plan, result, now + 0.05)

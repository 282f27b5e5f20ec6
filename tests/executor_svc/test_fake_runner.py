"""FakeRunner: deterministic tokens, same plan checks, no torch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice
from executor_svc.fake_runner import FakeRunner, fake_token
from executor_svc.runner_api import PlanError, Runner
from tests.executor_svc.helpers import Driver


def test_protocol_and_tokens():
    runner = FakeRunner(vocab_size=100)
    assert isinstance(runner, Runner)
    drv = Driver(runner, num_blocks=32)
    drv.add("a", [1, 2, 3], 4)
    drv.add("bb", [9] * 20, 2)
    done = drv.run(chunk=8)
    assert done["a"] == [fake_token("a", p, 100) for p in range(3, 7)]
    assert done["bb"] == [fake_token("bb", p, 100) for p in (20, 21)]
    assert done["a"] == [(97 + p) % 100 for p in range(3, 7)]


def test_avoid_tokens():
    runner = FakeRunner(vocab_size=100, avoid_token_ids=[0, 1])
    assert runner.token_for("a", 3) == 2  # (97 + 3) % 100 = 0 -> 1 -> 2


def test_simulator_plans_without_token_ids():
    runner = FakeRunner()
    plan = BatchPlan(new=(NewRequestSlice(req_id="s", num_tokens=10, num_new_tokens=10, sample=True),))
    result = runner.execute(plan)
    assert result.req_ids == ("s",)
    dec = CachedRequestSlice(req_id="s", num_computed_tokens=10, num_new_tokens=1, is_decode=True, sample=True)
    assert runner.execute(BatchPlan(step_id=1, cached=(dec,))).token_ids == (fake_token("s", 11, 32000),)


@pytest.mark.parametrize("plan", [
    BatchPlan(cached=(CachedRequestSlice(req_id="ghost", num_new_tokens=1, is_decode=True, sample=True),)),
    BatchPlan(new=(NewRequestSlice(req_id="a", num_tokens=4, num_new_tokens=5, sample=True),)),
    BatchPlan(new=(NewRequestSlice(req_id="a", num_tokens=4, num_new_tokens=4, sample=True),) * 2),
])
def test_rejects_bad_plans(plan):
    with pytest.raises(PlanError):
        FakeRunner().execute(plan)


def test_block_checks_when_enabled():
    runner = FakeRunner(num_blocks=4, check_blocks=True)
    plan = BatchPlan(new=(NewRequestSlice(req_id="a", num_tokens=20, num_new_tokens=20, block_ids=(0,), sample=True),))
    with pytest.raises(PlanError, match="blocks"):
        runner.execute(plan)


def test_cost_sleeps_and_reports():
    runner = FakeRunner(cost=lambda plan: 0.02)
    plan = BatchPlan(new=(NewRequestSlice(req_id="a", num_tokens=3, num_new_tokens=3, sample=True),))
    t0 = time.perf_counter()
    result = runner.execute(plan)
    assert time.perf_counter() - t0 >= 0.02
    assert result.forward_ns >= 20_000_000 and result.total_ns >= result.forward_ns
    virtual = FakeRunner(cost=lambda plan: 5.0, sleep=False).execute(plan)  # returns at once
    assert virtual.forward_ns == 5_000_000_000


def test_no_torch_import():
    code = ("import sys, executor_svc.fake_runner, executor_svc.runner_api, executor_svc.request_cache; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


class FakeClock:
    """perf_counter_ns and sleep for the fake runner: sleeping overshoots by ``overshoot_ns``."""

    def __init__(self, overshoot_ns: int) -> None:
        self.now_ns = 0
        self.overshoot_ns = overshoot_ns

    def perf_counter_ns(self) -> int:
        return self.now_ns

    def sleep(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9) + self.overshoot_ns


def test_a_sleeping_step_is_held_to_its_cost_with_its_own_tail(monkeypatch):
    # every step spends 300 us sampling after its sleep and the sleep overshoots by 200 us: without
    # correction each step would take cost + 0.5 ms; the runner learns that tail and sleeps it less
    import executor_svc.fake_runner as fr

    clock = FakeClock(overshoot_ns=200_000)
    monkeypatch.setattr(fr, "time", clock)
    runner = FakeRunner(cost=lambda plan: 0.02)
    real_token_for = runner.token_for

    def slow_token_for(req_id, position):
        clock.now_ns += 300_000
        return real_token_for(req_id, position)

    runner.token_for = slow_token_for
    runner.execute(BatchPlan(new=(NewRequestSlice(req_id="s", num_tokens=4, num_new_tokens=4, sample=True),)))
    durations = []
    for k in range(30):
        start = clock.now_ns
        dec = CachedRequestSlice(req_id="s", num_computed_tokens=4 + k, num_new_tokens=1, is_decode=True, sample=True)
        result = runner.execute(BatchPlan(cached=(dec,)))
        durations.append(clock.now_ns - start)
        assert result.total_ns == clock.now_ns - start  # what it reports is what it took
    assert durations[0] == 20_500_000 - int(0.2 * 500_000)  # one step of learning so far
    assert abs(durations[-1] - 20_000_000) < 10_000  # converged to the cost: within 10 us of 20 ms

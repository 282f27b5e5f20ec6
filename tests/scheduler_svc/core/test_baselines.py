"""Sarathi-Serve, vLLM-style, EDF and RAD: the rule that makes each one what it is."""

from __future__ import annotations

from scheduler_svc.core import SchedulerConfig, Tier, make_core
from tests.builders import core_with, decode_ids, make_request, prefill_chunks, run_to_completion, step


def test_sarathi_decodes_every_running_request_every_step():
    reqs = [make_request(16, 30) for _ in range(5)]
    core = core_with("sarathi-fcfs", *reqs)
    _, _, now = step(core, 0.0)
    for _ in range(20):
        core.add(make_request(2048, 1, arrival_s=now), now)  # prefill pressure does not delay decodes
    for _ in range(10):
        plan, _, now = step(core, now)
        assert set(decode_ids(plan)) == {r.req_id for r in reqs}
        assert plan.num_tokens == 512


def test_sarathi_fcfs_vs_spf_admission_order():
    for policy, expected in (("sarathi-fcfs", [0, 1]), ("sarathi-spf", [1, 0])):
        core = make_core(policy, num_blocks=4000)
        reqs = [make_request(300), make_request(100)]
        for r in reqs:
            core.add(r, 0.0)
        plan = core.schedule(0.0)
        assert [s.req_id for s in plan.new] == [reqs[i].req_id for i in expected]


def test_sarathi_preempts_the_latest_arrival():
    core = make_core("sarathi-fcfs", num_blocks=2, config=SchedulerConfig(watermark=0.0))
    early = make_request(16, 3, arrival_s=0.0)
    late = make_request(16, 3, arrival_s=0.1)
    core.add(early, 0.0)
    core.add(late, 0.1)
    _, _, now = step(core, 0.1)
    plan, _, _ = step(core, now)
    assert decode_ids(plan) == [early.req_id] and plan.preempted_ids == (late.req_id,)


def test_vllm_runs_prefill_only_or_decode_only_steps_with_whole_prompts():
    core = make_core("vllm", num_blocks=4000)
    core.add(make_request(16, 5), 0.0)
    _, _, now = step(core, 0.0)
    big = make_request(3000, 2, arrival_s=now)
    core.add(big, now)
    plan, _, now = step(core, now)
    assert prefill_chunks(plan) == {big.req_id: 3000} and decode_ids(plan) == []  # whole prompt, decodes stall
    plans, _ = run_to_completion(core, now)
    for p in plans:
        assert not (prefill_chunks(p) and decode_ids(p)), "vllm mixed prefill and decode"


def test_edf_meets_each_decodes_deadline_and_defers_the_rest():
    core = make_core("edf", num_blocks=4000)
    paying = make_request(16, 30, tier=Tier.PAYING)
    free = make_request(16, 30)
    core.add(paying, 0.0)
    core.add(free, 0.0)
    _, _, now = step(core, 0.0)
    for _ in range(30):
        core.add(make_request(2048, 1, arrival_s=now), now)
    times = {paying.req_id: [now], free.req_id: [now]}
    for _ in range(25):
        _, events, now = step(core, now)
        for e in events:
            if e.req_id in times:
                times[e.req_id].append(e.time_s)
    gaps = {k: [b - a for a, b in zip(v, v[1:])] for k, v in times.items()}
    assert max(gaps[paying.req_id]) <= 0.1 + 1e-9
    assert max(gaps[free.req_id]) <= 0.5 + 1e-9
    assert min(gaps[free.req_id]) >= 0.3  # deferred until about two steps before its deadline


def test_edf_laxity_orders_prefills_by_ttft_slack():
    core = make_core("edf", num_blocks=4000, config=SchedulerConfig(edf_prefill_order="laxity"))
    relaxed = make_request(100, 1)
    relaxed.ttft_slo_s = 5.0
    urgent = make_request(300, 1)
    urgent.ttft_slo_s = 0.2
    core.add(relaxed, 0.0)
    core.add(urgent, 0.0)
    assert [s.req_id for s in core.schedule(0.0).new] == [urgent.req_id, relaxed.req_id]


def test_rad_splits_by_maxweight():
    decoders = [make_request(16, 50) for _ in range(3)]
    core = core_with("rad", *decoders, num_blocks=20000)
    _, _, now = step(core, 0.0)
    # 3 decode-ready requests vs a prefill backlog worth far more than 3 mean prompts: prefill first
    for _ in range(10):
        core.add(make_request(4000, 1, arrival_s=now), now)
    plan, _, now = step(core, now)
    assert core.policy.last_split == "prefill-first"
    assert plan.num_tokens == 512 and plan.stats.num_prefill_tokens == 512
    # with no prefill backlog the decodes go first
    core2 = make_core("rad", num_blocks=20000)
    for r in [make_request(16, 50) for _ in range(3)]:
        core2.add(r, 0.0)
    _, _, now2 = step(core2, 0.0)
    core2.add(make_request(16, 1, arrival_s=now2), now2)
    plan2, _, _ = step(core2, now2)
    assert core2.policy.last_split == "decode-first" and len(decode_ids(plan2)) == 3


def test_rad_budget_is_tile_aligned():
    core = make_core("rad", num_blocks=4000, config=SchedulerConfig(token_budget=500, tile_size=64))
    core.add(make_request(2000, 1), 0.0)
    assert core.schedule(0.0).num_tokens == 448


def test_abort_frees_blocks_and_tells_the_runner():
    core = make_core("slai", num_blocks=100)
    r = make_request(64, 10)
    core.add(r, 0.0)
    _, _, now = step(core, 0.0)
    assert core.allocator.num_used_blocks > 0
    ev = core.abort(r.req_id, now)
    assert ev.finish_reason == "abort" and core.allocator.num_used_blocks == 0
    plan = core.schedule(now)
    assert plan.finished_ids == (r.req_id,) and plan.is_empty


def test_too_long_requests_are_ignored_with_a_finish_event():
    core = make_core("slai", num_blocks=100)
    ev = core.add(make_request(8000, 500), 0.0)
    assert ev.finish_reason == "ignored" and not core.requests


def test_stop_token_finishes_unless_ignore_eos():
    from scheduler_svc.core import Request, SamplingParams
    core = make_core("slai", num_blocks=100)
    stop = Request("s", 4, 10, 0.0, sampling=SamplingParams(stop_token_ids=(7,)))
    keep = Request("k", 4, 3, 0.0, sampling=SamplingParams(stop_token_ids=(7,), ignore_eos=True))
    core.add(stop, 0.0)
    core.add(keep, 0.0)
    _, events, _ = step(core, 0.0, token=7)
    reasons = {e.req_id: e.finish_reason for e in events}
    assert reasons == {"s": "stop", "k": None}
    run_to_completion(core)
    assert keep.num_output_tokens == 3


def test_user_overrides_win_over_the_variant_settings():
    core = make_core("slai", num_blocks=100, overrides=["fcfs=true", "token_budget=256"])
    assert core.config.fcfs and core.config.token_budget == 256
    a, b = make_request(300), make_request(100)
    core.add(a, 0.0)
    core.add(b, 0.0)
    assert [s.req_id for s in core.schedule(0.0).new] == [a.req_id]  # FCFS, and 256 < 300 fills the step

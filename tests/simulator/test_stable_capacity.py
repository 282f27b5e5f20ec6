"""The stable capacity criterion: steady-state window, TTFT tail, keeping up; never above the stability bound."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from contract.cost_models import PAPER_MODEL, resolve_cost_model
from simulator.capacity import find_capacities, run_point
from simulator.capacity_cli import capacity_record
from simulator.cli_args import RunSpec, stability_bound
from simulator.metrics import StableCriterion, from_timestamps, steady_window_start
from slai_serve.cli import main


def _req(i, arrival, ttft, tokens=3, gap=0.05, tier="free"):
    first = arrival + ttft
    return {"req_id": f"r{i}", "arrival_s": arrival, "tier": tier, "tbt_slo_s": 0.5,
            "token_times": [first + k * gap for k in range(tokens)]}


def test_steady_window_and_keeping_up_on_hand_built_timestamps():
    # 10 arrivals, 1 s apart; the late half waits longer and the last one finishes 30 s after it arrived
    reqs = [_req(i, float(i), 0.2 if i < 5 else 2.0) for i in range(9)] + [_req(9, 9.0, 30.0)]
    c = from_timestamps([])
    c.steady_from_s = steady_window_start([r["arrival_s"] for r in reqs], 0.5)
    assert c.steady_from_s == pytest.approx(4.5)
    for r in reqs:  # as from_timestamps does, on a collector with a window
        c.register(r["req_id"], r["arrival_s"], r["tier"], r["tbt_slo_s"])
        for k, t in enumerate(r["token_times"]):
            c.on_token(r["req_id"], t, 1, "length" if k == len(r["token_times"]) - 1 else None)
    s = c.summary()
    w = s["steady"]
    assert w["num_requests"] == 5 and w["ttft_p50_s"] == pytest.approx(2.0)
    assert s["ttft_p50_s"] == pytest.approx(1.1)  # the whole run's median hides the late half
    assert w["tbt_p99_s_by_tier"]["free"] == pytest.approx(0.05)
    assert s["drain_s"] == pytest.approx(30.1)  # last token (9 + 30 + 0.1) - last arrival (9)
    assert s["throughput_ratio"] == pytest.approx((10 / 39.1) / (10 / 9.0))
    # without a window there is no "steady" part, and the pooled TBT samples are the same
    plain = from_timestamps(reqs).summary()
    assert "steady" not in plain and plain["tbt_p99_s_by_tier"] == s["tbt_p99_s_by_tier"]


OK = {"ttft_p50_s": 0.3, "ttft_p99_s": 4.0, "tbt_p99_s_by_tier": {"paying": 0.09, "free": 0.3},
      "ttft_p99_s_by_tier": {"paying": 0.8, "free": 5.0}, "num_requests_by_tier": {"paying": 5, "free": 95},
      "num_unfinished": 0, "drain_s": 30.0, "throughput_ratio": 0.9}


def _with_window(s, **w):
    win = {k: s[k] for k in ("ttft_p50_s", "ttft_p99_s", "tbt_p99_s_by_tier", "ttft_p99_s_by_tier",
                             "num_requests_by_tier")}
    return {**s, "steady": {**win, "num_unfinished": 0, **w}}


def test_stable_criterion_conditions():
    crit = StableCriterion(ttft_p99_max_by_tier=(("paying", 1.0),))
    ok = _with_window(OK)
    assert crit.passes(ok) and crit.paper.passes(ok)
    # each condition fails on its own while the paper's criterion still passes
    for bad, binding in ((_with_window(OK, ttft_p50_s=0.7), "steady.ttft_p50"),
                         (_with_window({**OK, "ttft_p99_s": 12.0}), "ttft_p99"),
                         (_with_window({**OK, "ttft_p99_s_by_tier": {"paying": 1.5, "free": 5.0}}), "ttft_p99_paying"),
                         (_with_window(OK, tbt_p99_s_by_tier={"paying": 0.2, "free": 0.3}), "steady.tbt_p99_paying"),
                         (_with_window({**OK, "drain_s": 200.0, "throughput_ratio": 0.9}), "keeps_up")):
        assert crit.paper.passes(bad) and not crit.passes(bad), binding
        m = crit.margins(bad)
        assert min(m, key=m.get) == binding
    # keeping up: a long drain is fine when the throughput kept up, and the other way round
    assert crit.passes(_with_window({**OK, "drain_s": 200.0, "throughput_ratio": 0.98}))
    assert not crit.passes(_with_window({**OK, "drain_s": None, "throughput_ratio": None}))
    assert not crit.passes(_with_window(OK, num_unfinished=1))
    assert crit.describe()["ttft_p99_max_by_tier"] == {"paying": 1.0}


# A small synthetic workload (prompts <= 4,096, outputs <= 32 tokens: ~1.5 s a run) on which `edf`, which serves
# short prompts first and lets long ones starve, passes the paper's criterion above the stability bound.
STARVE_SPEC = RunSpec(num_requests=600, trace=None, seed=42, clip_factor=3.0, paying_prob=0.05, paying_tbt=0.1,
                      free_tbt=0.5, cost_model=PAPER_MODEL, num_blocks=14733, overrides=(), max_prompt_len=4096,
                      max_output_len=32)


def test_a_starving_policy_passes_the_paper_criterion_above_the_bound_but_not_the_stable_one():
    bound = stability_bound(STARVE_SPEC, "edf")
    lam = bound["lambda_max_nominal_qps"]
    crit = StableCriterion()
    grid = {q: run_point("edf", q, STARVE_SPEC, criterion=crit) for q in (3.5, 4.5, 4.9, 5.5)}
    above = [q for q in grid if q > lam]
    assert {4.5, 4.9} <= set(above)
    for q in (4.5, 4.9):
        s = grid[q]
        assert s["meets_slo_paper"] and not s["meets_slo_stable"], q
        assert s["ttft_p99_s"] > crit.ttft_p99_max_s  # the long prompts starve
    both = find_capacities(lambda q: pytest.fail(f"unexpected run at {q}"), crit, tol=1.0, known=grid)
    rec = capacity_record("edf", both, bound, "stable")
    assert rec["paper_capacity_qps"] > lam and rec["by_criterion"]["paper"]["exceeds_stability_bound"]
    assert rec["capacity_qps"] == rec["stable_capacity_qps"] <= lam
    assert not rec["exceeds_stability_bound"]


def test_tier_ttft_objectives_reach_the_requests_and_the_criterion(capsys):
    spec = replace(STARVE_SPEC, num_requests=40, paying_prob=0.5, paying_ttft=1.5)
    items = spec.workload(1.0)
    assert {it.ttft_slo_s for it in items if it.tier == "paying"} == {1.5}
    assert {it.ttft_slo_s for it in items if it.tier == "free"} == {None}
    assert items[0].to_request().ttft_slo_s == items[0].ttft_slo_s
    assert spec.ttft_objectives() == (("paying", 1.5),)
    assert main(["capacity", "--policy", "slai-adaptive", "--num-requests", "24", "--lo", "0.5", "--hi", "2",
                 "--tol", "0.5", "--paying-ttft", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["criterion"] == "stable" and out["criterion_settings"]["ttft_p99_max_by_tier"] == {"paying": 2.0}
    assert out["capacity_qps"] == out["stable_capacity_qps"] <= out["paper_capacity_qps"]
    assert {"stable", "paper"} == set(out["by_criterion"])


def test_compare_reports_both_capacities(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--policies", "sarathi-fcfs,slai", "--qps-grid", "1,2", "--num-requests", "24",
                 "--tol", "0.5", "--queue-policies", "", "--workers", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    for p in ("sarathi-fcfs", "slai"):
        c = res["capacity"][p]
        assert c["criterion"] == "stable" and c["capacity_qps"] == c["stable_capacity_qps"]
        assert c["stable_capacity_qps"] <= c["paper_capacity_qps"]
        assert math.isfinite(c["by_criterion"]["paper"]["fraction_of_stability_bound"])
    assert all("meets_slo_paper" in r and "meets_slo_stable" in r for r in res["grid"])
    md = (out / "results.md").read_text()
    assert "| policy | stable (QPS) |" in md and "Stable criterion" in md


def test_the_bound_counts_what_decodes_cost_in_a_gpu_shaped_model():
    paper = stability_bound(STARVE_SPEC, "sarathi-fcfs")
    assert "extra_work_s" not in paper  # the paper's fit: the bound and its keys as before
    per_decode = replace(PAPER_MODEL, c_ms_per_decode=2.0)
    b = stability_bound(replace(STARVE_SPEC, cost_model=per_decode), "sarathi-fcfs")
    # every request's D - 1 decodes add 2 ms each (outputs are >= 1 token)
    assert b["extra_work_s"] == pytest.approx(2e-3 * (b["mean_output"] - 1))
    work = (b["mean_prompt"] + b["mean_output"]) / b["tokens_per_s"] + b["extra_work_s"]
    assert b["lambda_max_effective_qps"] == pytest.approx(1 / work)
    assert b["lambda_max_effective_qps"] < paper["lambda_max_effective_qps"]
    # it bounds what a saturated run serves under the GPU-shaped model
    gpu = replace(STARVE_SPEC, cost_model=resolve_cost_model("gpu"))
    bound = stability_bound(gpu, "sarathi-fcfs")
    assert bound["lambda_max_nominal_qps"] < stability_bound(STARVE_SPEC, "sarathi-fcfs")["lambda_max_nominal_qps"]
    s = run_point("sarathi-fcfs", 2 * bound["lambda_max_nominal_qps"], gpu)
    assert s["num_unfinished"] == 0
    assert s["throughput_requests_per_s"] <= bound["lambda_max_effective_qps"]

"""``slai-serve agree``'s comparison, and the demo key file that lets ``up`` and ``bench-serve`` send two tiers.

The live half of ``agree`` (a whole stack for minutes) is a benchmark, not a test: its numbers are in
docs/results.md, *Live agreement*.
"""

from __future__ import annotations

import argparse
import json
import os
import stat

import pytest

from contract.model_files import default_model_dir
from contract.tiers import Tier
from gateway.auth import load_key_file
from slai_serve import agree, bench_serve, launch
from slai_serve.cli import main
from slai_serve.demo_keys import DEMO_KEYS_ENV, ensure_demo_keys


def test_compare_gives_ratios_and_checks_each_goal():
    live = {"ttft_p50_s": 0.54, "tbt_p99_s": 0.21, "e2e_p50_s": 10.0, "num_steps": 1000, "ttft_p99_s": 3.0}
    sim = {"ttft_p50_s": 0.50, "tbt_p99_s": 0.20, "e2e_p50_s": 10.6, "num_steps": 1049, "ttft_p99_s": 1.0}
    rows = {r["metric"]: r for r in agree.compare(live, sim)}
    assert rows["ttft_p50_s"]["ratio"] == 0.54 / 0.50 and rows["ttft_p50_s"]["ok"]  # 8% <= 10%
    assert rows["tbt_p99_s"]["ok"]  # 5% exactly
    assert rows["e2e_p50_s"]["ok"] is False  # 5.7% > 5%
    assert rows["num_steps"]["ok"]
    assert rows["ttft_p99_s"]["goal"] is None and rows["ttft_p99_s"]["ok"] is None  # shown, not judged
    assert rows["num_preemptions"]["ratio"] is None  # missing on both sides


def test_bad_loads_are_one_line_errors(capsys):
    assert main(["agree", "--policy", "slai", "--qps", "0"]) == 2
    assert main(["agree", "--policy", "slai", "--qps", "1,x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("slai-serve agree: error: ") for line in err)


def test_demo_keys_one_per_tier_anonymous_paying_and_stable(tmp_path):
    path = ensure_demo_keys(tmp_path / "sub" / "keys.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store = load_key_file(path)
    paying, free = store.key_for_tier("paying"), store.key_for_tier("free")
    assert paying and free and paying != free
    assert store.resolve(f"Bearer {paying}").tier == Tier.PAYING
    assert store.resolve(f"Bearer {free}").tier == Tier.FREE
    assert store.resolve(None).tier == Tier.PAYING  # clients without a key keep working, as without a key file
    before = path.read_text()
    assert ensure_demo_keys(path) == path and path.read_text() == before  # written once, never rotated


def _args(parser_fill, argv):
    p = argparse.ArgumentParser()
    parser_fill(p)
    return p.parse_args(argv)


def test_up_and_bench_serve_use_the_demo_keys_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv(DEMO_KEYS_ENV, str(tmp_path / "demo.json"))
    stack = launch.stack_from_args(_args(launch.add_arguments, ["--fake"]))
    assert stack.api_keys == str(tmp_path / "demo.json")
    keys = json.loads((tmp_path / "demo.json").read_text())["keys"]
    sent = bench_serve.tier_keys(_args(bench_serve.add_arguments, ["--qps", "1"]))
    assert {sent["paying"]: "paying", sent["free"]: "free"} == keys
    # opting out on either side
    assert launch.stack_from_args(_args(launch.add_arguments, ["--fake", "--no-demo-keys"])).api_keys == ""
    assert bench_serve.tier_keys(_args(bench_serve.add_arguments, ["--qps", "1", "--no-keys"])) == {
        "paying": None, "free": None}
    # an explicit key file wins over the demo keys
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"k-pay": "paying", "k-free": "free"}))
    assert launch.stack_from_args(_args(launch.add_arguments, ["--api-keys", str(own)])).api_keys == str(own)
    assert bench_serve.tier_keys(_args(bench_serve.add_arguments, ["--qps", "1", "--api-keys", str(own)])) == {
        "paying": "k-pay", "free": "k-free"}


def test_scheduler_ttft_mean_pools_the_tiers_of_the_histogram(tmp_path):
    page = tmp_path / "metrics"
    page.write_text('# TYPE slai_time_to_first_token_seconds histogram\n'
                    'slai_time_to_first_token_seconds_bucket{tier="free",le="0.5"} 3.0\n'
                    'slai_time_to_first_token_seconds_sum{tier="free"} 1.5\n'
                    'slai_time_to_first_token_seconds_count{tier="free"} 3.0\n'
                    'slai_time_to_first_token_seconds_sum{tier="paying"} 0.5\n'
                    'slai_time_to_first_token_seconds_count{tier="paying"} 1.0\n'
                    'slai_inter_token_latency_seconds_sum{tier="free"} 99.0\n')
    assert agree.scheduler_ttft_mean(page.as_uri()) == 2.0 / 4
    assert agree.scheduler_ttft_mean((tmp_path / "missing").as_uri()) is None


def test_agreement_is_judged_per_clock():
    live = {"ttft_p50_s": 0.6, "scheduler_ttft_p50_s": 0.52, "tbt_p99_s": 0.2, "scheduler_tbt_p99_s": 0.203,
            "e2e_p50_s": 10.0, "scheduler_e2e_p50_s": 10.0, "num_steps": 1000}
    sim = {"ttft_p50_s": 0.5, "scheduler_ttft_p50_s": 0.5, "tbt_p99_s": 0.2, "scheduler_tbt_p99_s": 0.2,
           "e2e_p50_s": 10.0, "scheduler_e2e_p50_s": 10.0, "num_steps": 1000}
    rows = agree.compare(live, sim)
    assert not agree.agrees_on(rows, agree.CLIENT_CLOCK)  # 20% on the client's clock
    assert agree.agrees_on(rows, agree.SCHEDULER_CLOCK)  # 4% on the scheduler's
    live["scheduler_tbt_p99_s"] = 0.22  # 10% above: the tail is judged on the scheduler's clock too
    assert not agree.agrees_on(agree.compare(live, sim), agree.SCHEDULER_CLOCK)
    live["scheduler_tbt_p99_s"] = 0.203
    del live["num_steps"]
    assert not agree.agrees_on(agree.compare(live, sim), agree.SCHEDULER_CLOCK)  # missing is not met


def test_histogram_quantile_pools_series_and_interpolates_like_prometheus():
    page = ('# TYPE x histogram\n'
            'x_bucket{le="0.1",tier="free"} 10.0\nx_bucket{le="0.2",tier="free"} 90.0\n'
            'x_bucket{le="+Inf",tier="free"} 100.0\nx_bucket{tier="paying",le="0.1"} 0.0\n'
            'x_bucket{tier="paying",le="0.2"} 0.0\nx_bucket{tier="paying",le="+Inf"} 0.0\nx_sum{tier="free"} 1.0\n')
    assert agree.histogram_quantile(page, "x", 0.5) == pytest.approx(0.1 + 0.1 * 40 / 80)
    assert agree.histogram_quantile(page, "x", 0.99) == pytest.approx(0.2)  # in +Inf: the last finite bound
    assert agree.histogram_quantile(page, "y", 0.5) is None
    # the simulated side through the same buckets gives what the scheduler's histogram would say
    samples = [0.05] * 10 + [0.15] * 80 + [0.3] * 10
    assert agree.samples_quantile(samples, (0.1, 0.2), 0.5) == agree.histogram_quantile(page, "x", 0.5)
    assert agree.samples_quantile([0.1], (0.1, 0.2), 0.5) == pytest.approx(0.05)  # le: the bound is inside
    assert agree.samples_quantile([], (0.1,), 0.5) is None


def test_scheduler_clock_summary_from_request_timings():
    timings = {f"r{i}": {"ttft_s": 0.1 * i, "e2e_s": 1.0 + i, "max_tbt_s": 0.1} for i in range(1, 4)}
    page = 'slai_inter_token_latency_seconds_bucket{le="0.5",tier="free"} 4.0\n' \
           'slai_inter_token_latency_seconds_bucket{le="+Inf",tier="free"} 4.0\n'
    s = agree.scheduler_clock_summary(timings, page)
    assert s["scheduler_ttft_p50_s"] == pytest.approx(0.2) and s["scheduler_e2e_p50_s"] == pytest.approx(3.0)
    assert s["scheduler_ttft_mean_s"] == pytest.approx(0.2)
    assert s["scheduler_tbt_p99_hist_s"] == pytest.approx(0.495)
    assert agree.scheduler_clock_summary({}, None) == {"scheduler_ttft_p50_s": None, "scheduler_ttft_mean_s": None,
                                                       "scheduler_e2e_p50_s": None, "scheduler_tbt_p99_hist_s": None}


def test_step_excess_is_the_live_mean_steps_excess():
    assert agree.step_excess_s({"mean_step_s": 0.032}, {"mean_step_s": 0.030}) == pytest.approx(0.002)
    assert agree.step_excess_s({"mean_step_s": 0.029}, {"mean_step_s": 0.030}) is None  # faster: nothing to add
    assert agree.step_excess_s({}, {"mean_step_s": 0.030}) is None


def test_planned_ahead_fraction():
    assert agree.planned_ahead_fraction({"num_steps": 200, "num_steps_planned_ahead": 150}) == 0.75
    assert agree.planned_ahead_fraction({"num_steps": 200}) == 0.0  # the plain simulator plans nothing ahead
    assert agree.planned_ahead_fraction({"num_steps": 0}) is None


def test_the_simulated_side_plans_ahead_with_the_live_schedulers_lead():
    assert agree.live_plan_ahead_lead_s([]) == pytest.approx(0.003)  # ServiceConfig's default
    assert agree.live_plan_ahead_lead_s(["--pipeline-lead-ms", "5", "--log-level", "INFO"]) == pytest.approx(0.005)
    assert agree.live_plan_ahead_lead_s(["--no-pipeline"]) is None
    with pytest.raises(ValueError, match="pipeline-lead-ms"):
        agree.live_plan_ahead_lead_s(["--pipeline-lead-ms=-1"])


def test_prompts_of_different_requests_share_no_kv_block():
    """Identical prompts would hit the scheduler's prefix cache, which the simulated requests cannot."""
    b = bench_serve.PromptBuilder(" the", 1, 8192, alt=" a")
    p = [_pieces(b.prompt(100, i)) for i in range(300)]
    assert all(len(x) == 99 for x in p)  # 100 tokens with the one special token
    assert len({tuple(x[:16]) for x in p}) == len(p)  # every first KV block (16 tokens) differs
    assert all(set(x[16:]) == {" the"} for x in p)
    assert b.prompt(100) == " the" * 99  # without an index: the repeated word, as before
    assert bench_serve.PromptBuilder(" the", 0, 8192).prompt(5, 3) == " the" * 5  # no second word: unmarked


def _pieces(text: str) -> list[str]:
    return [" " + w for w in text.split(" ")[1:]]


@pytest.mark.skipif(not (default_model_dir() / "tokenizer.json").is_file(), reason="no tokenizer")
def test_marked_prompts_keep_their_exact_token_length():
    from gateway.tokenizer import ModelTokenizer

    b = bench_serve.PromptBuilder.from_model_dir(str(default_model_dir()))
    assert b.alt
    tok = ModelTokenizer.from_dir(str(default_model_dir()))
    for n, i in [(1, 5), (3, 7), (16, 65535), (17, 3), (300, 12345)]:
        assert len(tok.encode(b.prompt(n, i))) == max(n, 1 + b.num_special)
    assert tok.encode(b.prompt(40, 1))[:16] != tok.encode(b.prompt(40, 2))[:16]

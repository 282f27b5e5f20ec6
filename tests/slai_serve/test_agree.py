"""``slai-serve agree``'s comparison, and the demo key file that lets ``up`` and ``bench-serve`` send two tiers.

The live half of ``agree`` (a whole stack for minutes) is a benchmark, not a test: its numbers are in
docs/results.md, *Live agreement*.
"""

from __future__ import annotations

import argparse
import json
import os
import stat

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

"""The CLI: ``sim --json`` keys, determinism through the CLI, capacity bisection, compare."""

import json

import pytest

from simulator.capacity import find_capacity
from simulator.metrics import SloCriterion
from slai_serve.cli import main

REQUIRED = ("policy", "qps", "num_requests", "ttft_p50_s", "ttft_p99_s", "ttft_p50_s_by_tier", "tbt_p99_s_by_tier",
            "throughput_tokens_per_s", "num_preemptions", "sim_time_s", "wall_time_s", "effective_qps",
            "slo_attainment_by_tier", "ttft_p99_s_by_tier", "meets_slo", "stability_bound")


def _sim_json(capsys, *extra):
    assert main(["sim", "--policy", "slai", "--qps", "2", "--num-requests", "40", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_sim_json_keys_and_determinism(capsys):
    a = _sim_json(capsys)
    for k in REQUIRED:
        assert k in a, k
    assert set(a["ttft_p50_s_by_tier"]) == {"paying", "free"}
    assert set(a["tbt_p99_s_by_tier"]) == {"paying", "free"}
    assert a["policy"] == "slai" and a["qps"] == 2.0 and a["num_requests"] == 40 and a["num_finished"] == 40
    b = _sim_json(capsys)
    for d in (a, b):
        d.pop("wall_time_s"), d.pop("sim_speed")
    assert a == b
    c = _sim_json(capsys, "--seed", "7")
    assert c["ttft_p50_s"] != a["ttft_p50_s"]


def test_sim_set_and_steps_out(capsys, tmp_path):
    steps = tmp_path / "steps.csv"
    a = _sim_json(capsys, "--set", "token_budget=256", "--steps-out", str(steps))
    assert a["overrides"] == ["token_budget=256"] and a["stability_bound"]["token_budget"] == 256
    header = steps.read_text().splitlines()[0].split(",")
    assert {"t", "prefill_tokens", "decodes", "critical_decodes", "kv_used", "num_waiting"} <= set(header)


def test_sim_max_lengths_clip_like_bench_serve(capsys):
    # the same clipping as `bench-serve --max-prompt-len/--max-output-len` (slai_serve.bench_serve uses clip_lengths too)
    from simulator.workloads import clip_lengths
    from slai_serve import bench_serve as loadgen

    assert loadgen.clip_lengths is clip_lengths
    a = _sim_json(capsys, "--max-prompt-len", "64", "--max-output-len", "16")
    assert a["max_prompt_len"] == 64 and a["max_output_len"] == 16 and a["num_finished"] == 40
    assert a["num_output_tokens"] <= 40 * 16
    assert a["stability_bound"]["mean_prompt"] <= 64 and a["stability_bound"]["mean_output"] <= 16
    b = _sim_json(capsys)
    assert b["max_prompt_len"] == 0 and b["num_output_tokens"] > a["num_output_tokens"]


def test_find_capacity_on_a_known_curve():
    # median TTFT = 0.21 * qps -> passes below 0.5 / 0.21 = 2.381 QPS
    def trial(q):
        return {"ttft_p50_s": 0.21 * q, "tbt_p99_s_by_tier": {"paying": 0.05, "free": 0.1}, "num_unfinished": 0}

    r = find_capacity(trial, SloCriterion(), lo=0.25, hi=1.0, tol=0.02)
    assert r["capacity_qps"] < 0.5 / 0.21 <= r["first_failing_qps"]
    assert r["first_failing_qps"] - r["capacity_qps"] <= 0.02
    assert r["capacity_qps_interpolated"] == pytest.approx(0.5 / 0.21, abs=1e-6)
    assert r["binding_constraint"] == "ttft_p50"
    # a grid narrows the bracket: fewer new trials
    grid = {q: trial(q) for q in (0.5, 1.0, 1.5, 2.0, 3.0)}
    r2 = find_capacity(trial, SloCriterion(), known=grid)
    assert r2["num_trials"] < r["num_trials"] and r2["capacity_qps"] == pytest.approx(r["capacity_qps"], abs=0.02)


def test_capacity_cli_tiny(capsys):
    assert main(["capacity", "--policy", "sarathi-fcfs", "--num-requests", "24", "--lo", "0.5", "--hi", "2",
                 "--tol", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "sarathi-fcfs" and out["capacity_qps"] > 0
    assert out["trials"] and 0 < out["fraction_of_stability_bound"] < 2
    passing = [t["qps"] for t in out["trials"] if t["passes"]]
    assert max(passing) == out["capacity_qps"]


def test_compare_tiny(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--policies", "slai,vllm", "--qps-grid", "1,2", "--num-requests", "16", "--no-capacity",
                 "--queue-qps", "2", "--workers", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["grid"]) == 4 and "stability_bound" in res
    assert (out / "results.md").read_text().startswith("# Simulated comparison")
    for png in ("ttft_vs_qps.png", "tbt_vs_qps.png", "queue_length.png"):
        assert (out / png).stat().st_size > 1000

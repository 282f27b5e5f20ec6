"""The shared-prefix workload and the prefix cache's effect in the simulator."""

from __future__ import annotations

import json

import pytest

from simulator.workloads import make_workload
from slai_serve.cli import main


def test_shared_prefix_workload_adds_prefixes_and_keeps_the_other_streams():
    plain = make_workload(60, 2.0, seed=3)
    shared = make_workload(60, 2.0, seed=3, shared_prefix_len=100, num_prefixes=3)
    assert [it.arrival_s for it in shared] == [it.arrival_s for it in plain]
    assert [it.tier for it in shared] == [it.tier for it in plain]
    assert {it.prefix_id for it in shared} == {0, 1, 2}
    reqs = [it.to_request() for it in shared]
    for it, plain_it, r in zip(shared, plain, reqs):
        assert it.prompt_len == min(plain_it.prompt_len, 8192 - 100 - it.output_len) + 100
        assert len(r.prompt_token_ids) == r.num_prompt_tokens
    by_prefix: dict[int, set] = {}
    for it, r in zip(shared, reqs):
        by_prefix.setdefault(it.prefix_id, set()).add(tuple(r.prompt_token_ids[:100]))
        assert r.prompt_token_ids[100] not in {o.prompt_token_ids[100] for o in reqs if o is not r}
    assert all(len(v) == 1 for v in by_prefix.values()) and len({next(iter(v)) for v in by_prefix.values()}) == 3
    assert plain[0].to_request().prompt_token_ids is None
    with pytest.raises(ValueError, match="num_prefixes"):
        make_workload(5, 1.0, shared_prefix_len=10)


def _sim(capsys, *extra):
    assert main(["sim", "--policy", "slai", "--qps", "2", "--num-requests", "60", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_sim_reports_the_hit_rate_and_caching_cuts_prefill_work(capsys):
    plain = _sim(capsys)
    assert "prefix_cache_hit_rate" not in plain and "shared_prefix_len" not in plain  # no token ids: no lookups
    on = _sim(capsys, "--shared-prefix-len", "512", "--num-prefixes", "2")
    off = _sim(capsys, "--shared-prefix-len", "512", "--num-prefixes", "2", "--set", "enable_prefix_caching=false")
    assert on["shared_prefix_len"] == 512 and on["num_prefixes"] == 2
    assert "prefix_cache_hit_rate" not in off
    # every request but the first of each prefix finds the prefix's 32 full blocks cached
    assert on["prefix_cache_hits"] >= (60 - 2) * 512 * 0.9
    assert 0 < on["prefix_cache_hit_rate"] == on["prefix_cache_hits"] / on["prefix_cache_queries"] < 1
    assert on["num_finished"] == off["num_finished"] == 60
    assert on["ttft_p50_s"] < off["ttft_p50_s"]


def test_sim_rejects_bad_prefix_options(capsys):
    with pytest.raises(SystemExit, match="num-prefixes"):
        main(["sim", "--policy", "slai", "--qps", "2", "--num-requests", "5", "--shared-prefix-len", "8",
              "--num-prefixes", "0"])

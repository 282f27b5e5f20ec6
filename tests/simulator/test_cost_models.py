import json
import math

import numpy as np
import pytest

from contract.cost_models import PAPER_MODEL, CostModel, fit_cost_model, load_timings, plan_features, resolve_cost_model
from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice, PlanStats


def test_paper_model_values():
    assert PAPER_MODEL.time_ms(1) == pytest.approx(23.4)
    assert PAPER_MODEL.time_ms(180) == pytest.approx(23.4)  # below the knee
    assert PAPER_MODEL.time_ms(512) == pytest.approx(6.95 + 0.0912 * 512)
    assert PAPER_MODEL.full_step_s(512) == pytest.approx(0.0536444)
    assert PAPER_MODEL.with_overhead(1.5).time_ms(512) == pytest.approx(6.95 + 0.0912 * 512 + 1.5)


def test_plan_features_and_context_terms():
    plan = BatchPlan(
        step_id=1,
        new=(NewRequestSlice(req_id="a", num_tokens=300, num_new_tokens=200),),
        cached=(CachedRequestSlice(req_id="b", num_computed_tokens=100, num_new_tokens=50),
                CachedRequestSlice(req_id="c", num_computed_tokens=1000, num_new_tokens=1, is_decode=True, sample=True),
                CachedRequestSlice(req_id="d", num_computed_tokens=500, num_new_tokens=1, is_decode=True, sample=True)),
        stats=PlanStats(num_prefill_tokens=250, num_decodes=2))
    f = plan_features(plan)
    assert f == {"batch_tokens": 252, "num_decodes": 2, "sum_decode_context": 1500.0,
                 "sum_chunk_context": 200 * 200 + 50 * 150.0}
    m = CostModel(a0_ms=10, a1_ms=1, b_ms_per_token=0.1, c_ms_per_decode=0.5, d_ms_per_context_token=0.001,
                  e_ms_per_chunk_context=1e-5, overhead_ms=2)
    expect = max(10, 1 + 0.1 * 252) + 0.5 * 2 + 0.001 * 1500 + 1e-5 * (40000 + 7500) + 2
    assert m.step_time_s(plan) == pytest.approx(expect / 1e3)
    # without context terms the fast path uses the plan's stats only
    assert PAPER_MODEL.step_time_s(plan) == pytest.approx(PAPER_MODEL.time_ms(252) / 1e3)


def test_a_plan_off_the_wire_costs_what_the_simulator_charges():
    """The fake executor prices plans decoded from the wire, which carry no stats: it must
    charge what the simulator charges for the same plan (not the 1-token floor)."""
    from wire.executor_codec import plan_from_pb, plan_to_pb

    plan = BatchPlan(
        step_id=3,
        new=(NewRequestSlice(req_id="a", num_tokens=300, num_new_tokens=300, sample=True),),
        cached=tuple(CachedRequestSlice(f"d{i}", (), 100 + i, 1, True, True) for i in range(40)),
        stats=PlanStats(num_prefill_tokens=300, num_decodes=40))
    wired = plan_from_pb(plan_to_pb(plan))
    assert wired.stats == PlanStats()  # the wire carries no stats
    assert PAPER_MODEL.step_time_s(wired) == PAPER_MODEL.step_time_s(plan) == pytest.approx(PAPER_MODEL.time_ms(340) / 1e3)
    assert PAPER_MODEL.step_time_s(wired) > PAPER_MODEL.time_ms(0) / 1e3
    assert PAPER_MODEL.step_time_s(BatchPlan()) == pytest.approx(PAPER_MODEL.time_ms(0) / 1e3)


def test_json_round_trip(tmp_path):
    m = CostModel(name="x", a0_ms=20, a1_ms=5, b_ms_per_token=0.08, c_ms_per_decode=0.3,
                  d_ms_per_context_token=1e-4, e_ms_per_chunk_context=2e-6, overhead_ms=0.7, description="t")
    p = tmp_path / "m.json"
    m.save(p, extra={"n": 3})
    assert CostModel.load(p) == m
    assert resolve_cost_model(str(p)) == m
    assert resolve_cost_model(None) == PAPER_MODEL
    assert resolve_cost_model("paper", overhead_ms=1.0).overhead_ms == 1.0
    d = json.loads(p.read_text())
    d["bogus"] = 1
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError):
        CostModel.load(p)


def _synthetic_rows(true: CostModel, n: int = 300, seed: int = 0, noise_ms: float = 0.0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        npf = int(rng.choice([0, 16, 64, 128, 256, 384, 512, 768, 1024]))
        nd = int(rng.integers(0, 64))
        dctx = float(nd * rng.integers(100, 3000))
        cctx = float(npf * (npf + rng.integers(0, 2048)))
        ms = true.time_ms(npf + nd, nd, dctx, cctx) - true.overhead_ms + rng.normal(0, noise_ms)
        rows.append({"num_prefill_tokens": npf, "num_decodes": nd, "decode_context": dctx, "chunk_context": cctx,
                     "forward_ms": ms})
    return rows


def test_fitter_recovers_known_coefficients(tmp_path):
    true = CostModel(a0_ms=23.4, a1_ms=6.95, b_ms_per_token=0.0912, c_ms_per_decode=0.2,
                     d_ms_per_context_token=2e-4, e_ms_per_chunk_context=3e-6)
    rows = _synthetic_rows(true)
    path = tmp_path / "steps.csv"
    with open(path, "w") as fh:
        fh.write(",".join(rows[0]) + "\n")
        for r in rows:
            fh.write(",".join(str(v) for v in r.values()) + "\n")
    model, diag = fit_cost_model(load_timings(path))
    assert model.a0_ms == pytest.approx(23.4, rel=1e-6)
    assert model.a1_ms == pytest.approx(6.95, rel=1e-6)
    assert model.b_ms_per_token == pytest.approx(0.0912, rel=1e-6)
    assert model.c_ms_per_decode == pytest.approx(0.2, rel=1e-6)
    assert model.d_ms_per_context_token == pytest.approx(2e-4, rel=1e-6)
    assert model.e_ms_per_chunk_context == pytest.approx(3e-6, rel=1e-6)
    assert diag["rmse_ms"] < 1e-6


def test_fitter_json_input_ns_and_mean_context(tmp_path):
    true = CostModel(a0_ms=12.0, a1_ms=4.0, b_ms_per_token=0.05, d_ms_per_context_token=1e-4)
    rows = _synthetic_rows(true, noise_ms=0.05, seed=1)
    js = [{"num_prefill_tokens": r["num_prefill_tokens"], "num_decodes": r["num_decodes"],
           "decode_context_mean": (r["decode_context"] / r["num_decodes"]) if r["num_decodes"] else 0,
           "total_ns": int(r["forward_ms"] * 1e6)} for r in rows]
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"steps": js}))
    model, diag = fit_cost_model(load_timings(path))
    assert model.b_ms_per_token == pytest.approx(0.05, rel=0.02)
    assert model.d_ms_per_context_token == pytest.approx(1e-4, rel=0.05)
    assert model.a0_ms == pytest.approx(12.0, abs=0.1)
    assert diag["mape"] < 0.02


def test_fit_cli_writes_a_loadable_model(tmp_path, capsys):
    from slai_serve.cli import main

    true = CostModel(a0_ms=20.0, a1_ms=5.0, b_ms_per_token=0.1)
    rows = _synthetic_rows(true, n=60, seed=2)
    src = tmp_path / "in.csv"
    src.write_text("num_prefill_tokens,num_decodes,decode_context,forward_ms\n" + "".join(
        f"{r['num_prefill_tokens']},{r['num_decodes']},0,{true.time_ms(r['num_prefill_tokens'] + r['num_decodes'])}\n"
        for r in rows))
    out = tmp_path / "model.json"
    assert main(["fit-cost-model", str(src), "--out", str(out), "--overhead-ms", "0.5"]) == 0
    m = CostModel.load(out)
    assert m.b_ms_per_token == pytest.approx(0.1, rel=1e-6) and m.overhead_ms == 0.5
    assert math.isfinite(json.loads(capsys.readouterr().out)["fit"]["rmse_ms"])


def test_mixing_penalty_applies_only_to_mixed_steps_above_the_decode_share():
    m = CostModel(a0_ms=0, a1_ms=10, b_ms_per_token=0.1, mix_ms_per_decode=0.5, mix_decode_share=0.2)
    base = CostModel(a0_ms=0, a1_ms=10, b_ms_per_token=0.1)
    # 100 tokens, 20 decodes = exactly 20%: no penalty; 40 decodes: 20 above the share
    assert m.time_ms(100, 20) == pytest.approx(base.time_ms(100, 20))
    assert m.time_ms(100, 40) == pytest.approx(base.time_ms(100, 40) + 0.5 * 20)
    # pure decode and pure prefill steps are never penalised
    assert m.time_ms(100, 100) == pytest.approx(base.time_ms(100, 100))
    assert m.time_ms(100, 0) == pytest.approx(base.time_ms(100, 0))
    plan = BatchPlan(
        step_id=1, new=(NewRequestSlice(req_id="a", num_tokens=60, num_new_tokens=60),),
        cached=tuple(CachedRequestSlice(req_id=f"d{i}", num_computed_tokens=10, num_new_tokens=1, is_decode=True,
                                        sample=True) for i in range(40)),
        stats=PlanStats(num_prefill_tokens=60, num_decodes=40))
    assert m.step_time_s(plan) == pytest.approx((10 + 0.1 * 100 + 0.5 * (40 - 0.2 * 100)) / 1e3)
    with pytest.raises(ValueError, match="mix_decode_share"):
        CostModel(mix_decode_share=1.5)


def test_gpu_model_is_selectable_and_the_paper_model_is_unchanged(tmp_path):
    gpu = resolve_cost_model("gpu")
    assert gpu.mix_ms_per_decode > 0 and gpu.d_ms_per_context_token > 0 and gpu.c_ms_per_decode > 0
    assert gpu.full_step_s(512) == pytest.approx(PAPER_MODEL.full_step_s(512))  # same batch-size terms
    assert gpu.time_ms(512, 128, 128 * 1000) > PAPER_MODEL.time_ms(512, 128)
    # the paper model keeps its field set (sim --json output stays the same); the gpu model round-trips
    assert "mix_ms_per_decode" not in PAPER_MODEL.to_dict()
    gpu.save(tmp_path / "g.json")
    assert CostModel.load(tmp_path / "g.json") == gpu


def _prefill_plan(step_id: int, computed: int, chunk: int) -> BatchPlan:
    return BatchPlan(step_id=step_id, cached=(CachedRequestSlice(
        req_id="r", num_computed_tokens=computed, num_new_tokens=chunk, is_decode=False, sample=False),),
        stats=PlanStats(num_prefill_tokens=chunk))


def test_request_extra_work_is_what_its_decodes_and_chunks_cost_beyond_their_tokens():
    m = CostModel(c_ms_per_decode=0.5, d_ms_per_context_token=0.01, e_ms_per_chunk_context=0.001)
    # P = 10, D = 4: three decodes attend to 10, 11 and 12 cached tokens; the prompt's pairs at least 10^2 / 2
    assert m.request_extra_ms(10, 4) == pytest.approx(0.5 * 3 + 0.01 * 33 + 0.001 * 50)
    decode_steps = sum(m.time_ms(1, 1, ctx) for ctx in (10, 11, 12))
    assert m.request_extra_ms(10, 4) - 0.001 * 50 == pytest.approx(decode_steps)
    # any chunking of the prompt pays at least the P^2 / 2 that the bound counts
    for chunks in ((10,), (5, 5), (1,) * 10, (3, 3, 4)):
        done, pairs = 0, 0.0
        for c in chunks:
            pairs += plan_features(_prefill_plan(1, done, c))["sum_chunk_context"]
            done += c
        assert pairs >= 10 * 10 / 2
    assert PAPER_MODEL.request_extra_ms(2000, 400) == 0.0 and m.request_extra_ms(10, 1) == pytest.approx(0.05)

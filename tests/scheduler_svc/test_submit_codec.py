"""Round trips of the codec functions the services added."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from contract.executor_info import ExecutorInfo
from contract.plan import BatchPlan, NewRequestSlice
from contract.sampling import SamplingParams
from contract.tiers import Tier
from gateway import codec
from scheduler_svc import submit_codec
from scheduler_svc.core.request import Request
from scheduler_svc.core.token_event import TokenEvent
from scheduler_svc.core.token_ids import TokenIds
from scheduler_svc.stats import ExecutorStatsView
from wire import executor_codec
from wire.pb.slai.v1 import common_pb2, scheduler_pb2


def test_submit_round_trip():
    req = Request("r1", 3, 7, 0.0, tier=Tier.PAYING, tbt_slo_s=0.05, ttft_slo_s=1.5,
                  prompt_token_ids=TokenIds([5, 6, 70000]),
                  sampling=SamplingParams(temperature=0.5, top_p=0.75, top_k=4, seed=9, stop_token_ids=(2,),
                                          ignore_eos=True))
    back = submit_codec.request_from_submit_pb(submit_codec.submit_to_pb(req), now=12.5)
    assert back.req_id == "r1" and back.arrival_s == 12.5 and back.tier == Tier.PAYING
    assert back.prompt_token_ids == (5, 6, 70000) and back.num_prompt_tokens == 3 and back.max_tokens == 7
    assert back.tbt_slo_s == pytest.approx(0.05) and back.ttft_slo_s == pytest.approx(1.5)
    assert back.sampling == req.sampling


def test_submit_defaults_and_tiers():
    msg = scheduler_pb2.SubmitRequest(request_id="a", prompt_token_ids=[1], max_tokens=1)
    req = submit_codec.request_from_submit_pb(msg, 0.0)
    assert req.tier == Tier.FREE and req.tbt_slo_s is None and req.ttft_slo_s is None
    assert req.sampling == SamplingParams()
    msg.tier = common_pb2.TIER_PAYING
    assert submit_codec.request_from_submit_pb(msg, 0.0).tier == Tier.PAYING


@pytest.mark.parametrize("mutate,field", [
    (lambda m: m.ClearField("prompt_token_ids"), "prompt_token_ids"),
    (lambda m: setattr(m, "max_tokens", 0), "max_tokens"),
    (lambda m: setattr(m, "request_id", ""), "request_id"),
    (lambda m: setattr(m.sampling, "top_p", 1.01), "sampling.top_p"),
    (lambda m: setattr(m.sampling, "temperature", -0.1), "sampling.temperature"),
    (lambda m: setattr(m.sampling, "temperature", float("nan")), "sampling.temperature"),
    (lambda m: setattr(m, "tbt_slo_s", -1.0), "tbt_slo_s"),
    (lambda m: setattr(m, "tier", 9), "tier"),
])
def test_submit_errors_name_the_field(mutate, field):
    msg = scheduler_pb2.SubmitRequest(request_id="a", prompt_token_ids=[1, 2], max_tokens=3)
    mutate(msg)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        submit_codec.request_from_submit_pb(msg, 0.0)


def test_token_ids_are_compact_and_tuple_like():
    ids = TokenIds(range(1000, 3000))
    as_tuple = tuple(range(1000, 3000))
    assert len(ids) == 2000 and ids == as_tuple and ids[5] == 1005 and list(ids[:2]) == [1000, 1001]
    assert sys.getsizeof(ids) < 0.2 * (sys.getsizeof(as_tuple) + 2000 * 28)
    req = Request("r", 2000, 5, 0.0, prompt_token_ids=ids)
    req.output_token_ids.extend([7, 8])
    assert req.all_token_ids() == as_tuple + (7, 8)
    # a plan built from it encodes and decodes
    plan = BatchPlan(step_id=3, new=(NewRequestSlice(req_id="r", token_ids=req.all_token_ids(), num_tokens=2002,
                                                     block_ids=tuple(range(126)), num_new_tokens=2002,
                                                     sample=True),))
    back = executor_codec.plan_from_pb(executor_codec.plan_to_pb(plan))
    assert back.new[0].token_ids == as_tuple + (7, 8) and back.new[0].block_ids == tuple(range(126))


def test_final_event_round_trip():
    ev = TokenEvent(req_id="r", token_ids=(4,), finish_reason="length", time_s=3.0, num_prompt_tokens=10,
                    num_output_tokens=2)
    msg = submit_codec.final_token_event_to_pb(ev, prompt_tokens=12, completion_tokens=5, ttft_s=0.5, e2e_s=2.5,
                                        queue_s=0.25, max_tbt_s=0.75, num_preemptions=1)
    back = submit_codec.token_event_from_pb(msg)
    assert back.finish_reason == "length" and back.token_ids == (4,) and back.time_s == 3.0
    assert (back.num_prompt_tokens, back.num_output_tokens) == (12, 5)
    assert dataclasses.asdict(codec.timings_from_pb(msg.timings)) == {
        "ttft_s": 0.5, "e2e_s": 2.5, "queue_s": 0.25, "max_tbt_s": 0.75, "num_preemptions": 1}
    with pytest.raises(ValueError):
        submit_codec.final_token_event_to_pb(TokenEvent(req_id="r"), prompt_tokens=1, completion_tokens=0, ttft_s=0,
                                      e2e_s=0, queue_s=0, max_tbt_s=0, num_preemptions=0)
    assert submit_codec.token_event_from_pb(submit_codec.error_event_to_pb("x")).finish_reason == "error"


def test_stats_round_trip():
    views = [ExecutorStatsView(address="a:1", healthy=True, num_waiting=3, num_running=2, num_blocks=100,
                               kv_used_fraction=0.5, mean_batch_s=0.025, num_steps=9, num_preemptions=1,
                               last_num_critical_decodes=2, last_num_noncritical_decodes=1,
                               last_num_prefill_tokens=300, last_offset=5.0, mean_decision_s=1e-4,
                               mean_executor_wait_s=5e-4, mean_rpc_overhead_s=3e-4),
             ExecutorStatsView(address="b:2")]
    back = submit_codec.stats_from_pb(submit_codec.stats_to_pb("slai", views, 7, 700))
    assert back["policy"] == "slai" and back["num_queued_total"] == 7 and back["num_queued_prompt_tokens"] == 700
    for view, got in zip(views, back["executors"]):
        for k, v in got.items():
            assert v == pytest.approx(getattr(view, k)), k


def test_info_and_warmup_round_trip():
    info = ExecutorInfo(model="m", device="cuda:0", dtype="float16", attention_backend="flash-attn", block_size=16,
                      num_blocks=14733, max_model_len=8192, vocab_size=32000, eos_token_ids=(2, 3))
    back = executor_codec.info_from_pb(executor_codec.info_to_pb(info, ready=True))
    assert back == ExecutorInfo(model="m", device="cuda:0", dtype="float16", attention_backend="flash-attn",
                                      block_size=16, num_blocks=14733, max_model_len=8192, vocab_size=32000,
                                      eos_token_ids=(2, 3), ready=True)
    assert executor_codec.warmup_from_pb(executor_codec.warmup_to_pb(100, 512)) == (100, 512)
    assert executor_codec.warmup_from_pb(executor_codec.warmup_to_pb(None, 256)) == (None, 256)

"""Round trips through the one wire-conversion module."""

from scheduler_svc import submit_codec
from scheduler_svc.core import BatchPlan, CachedRequestSlice, NewRequestSlice, SamplingParams, StepResult, TokenEvent
from wire import executor_codec


def test_plan_round_trip():
    plan = BatchPlan(
        step_id=9,
        new=(NewRequestSlice("a", (5, 6, 7), 3, SamplingParams(temperature=0.5, top_p=0.9, top_k=4, seed=3,
                                                               stop_token_ids=(2,), ignore_eos=True),
                             (4, 1), 0, 3, True),),
        cached=(CachedRequestSlice("b", (8,), 31, 1, True, True), CachedRequestSlice("c", (), 16, 64, False, False)),
        finished_ids=("x",), preempted_ids=("y", "z"))
    assert executor_codec.plan_from_pb(executor_codec.plan_to_pb(plan)) == plan


def test_result_round_trip():
    r = StepResult(step_id=4, req_ids=("a", "b"), token_ids=(1, 2), prepare_ns=1, forward_ns=2, sample_ns=3,
                   total_ns=9)
    assert executor_codec.result_from_pb(executor_codec.result_to_pb(r)) == r


def test_token_event_round_trip():
    ev = TokenEvent(req_id="a", token_ids=(3,), finish_reason="length", time_s=1.5, is_first=True,
                    num_prompt_tokens=4, num_output_tokens=1, ttft_s=0.25, tbt_s=None)
    assert submit_codec.token_event_from_pb(submit_codec.token_event_to_pb(ev)) == ev


def test_bad_sampling_is_a_value_error():
    import pytest

    from wire.pb.slai.v1 import common_pb2
    with pytest.raises(ValueError, match="temperature"):
        executor_codec.sampling_from_pb(common_pb2.SamplingParams(temperature=-1))


def test_issue15_sampling_options_logprobs_and_prompt_length_round_trip():
    from contract.logprobs import SampleLogprobs, TokenLogprob

    sp = SamplingParams(temperature=0.5, presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.25,
                        logit_bias=((3, -100.0), (7, 2.5)), min_tokens=2, logprobs=0, prompt_logprobs=5)
    assert executor_codec.sampling_from_pb(executor_codec.sampling_to_pb(sp)) == sp
    plan = BatchPlan(step_id=1, new=(NewRequestSlice("a", (5, 6, 7), 3, sp, (4,), 0, 3, True, num_prompt_tokens=2),))
    assert executor_codec.plan_from_pb(executor_codec.plan_to_pb(plan)) == plan
    lp = SampleLogprobs(TokenLogprob(1, -0.5, (1, 4), (-0.5, -1.5)), (TokenLogprob(6, -2.0), TokenLogprob(7, -0.25)))
    r = StepResult(step_id=4, req_ids=("a", "b", "c"), token_ids=(1, 2, 3),
                   logprobs=(lp, None, SampleLogprobs(None, ())))
    assert executor_codec.result_from_pb(executor_codec.result_to_pb(r)) == r
    ev = TokenEvent(req_id="a", token_ids=(1,), time_s=1.0, logprobs=(lp,))
    assert submit_codec.token_event_from_pb(submit_codec.token_event_to_pb(ev)) == ev

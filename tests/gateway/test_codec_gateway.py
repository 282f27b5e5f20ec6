"""Round trips of the gateway conversions in gateway.codec."""

from __future__ import annotations

from gateway import codec
from gateway.types import Delta, GenerationInput, Timings


def test_generation_input_round_trip():
    for inp in (GenerationInput(prompt="hi", max_tokens=5, temperature=0.5, top_p=0.5, top_k=3, seed=9,
                                ignore_eos=True, stop=("a", "b"), model="m", request_id="r1"),
                GenerationInput(messages=(("system", "s"), ("user", "u")), max_tokens=0)):
        assert codec.generate_input_from_pb(codec.generate_input_to_pb(inp)) == inp


def test_delta_round_trip():
    last = Delta("r", "x", (1, 2), "length", 3, 2, Timings(0.25, 1.0, 0.125, 0.5, 1))
    assert codec.delta_from_pb(codec.delta_to_pb(last)) == last
    mid = Delta("r", "é", (7,))
    assert codec.delta_from_pb(codec.delta_to_pb(mid)) == mid


def test_issue15_options_and_logprobs_round_trip():
    from contract.logprobs import TokenLogprob

    inp = GenerationInput(prompt="hi", n=3, presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.25,
                          logit_bias=((3, -100.0), (7, 2.5)), min_tokens=2, stop_token_ids=(9, 4), logprobs=3,
                          prompt_logprobs=1, score_only=True)
    assert codec.generate_input_from_pb(codec.generate_input_to_pb(inp)) == inp
    lp = (TokenLogprob(1, -0.5, (1, 4), (-0.5, -1.5)), TokenLogprob(2, -0.25))
    d = Delta("r", "ab", (1, 2), index=2, logprobs=lp, prompt_logprobs=(TokenLogprob(8, -3.0),))
    assert codec.delta_from_pb(codec.delta_to_pb(d)) == d

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

"""One end-to-end run with the real torch runner (tiny random-weight preset) behind gRPC."""

from __future__ import annotations

import asyncio

import pytest

from tests.scheduler_svc.helpers import collect, start_stack, submit_msg, tokens_of

runner_mod = pytest.importorskip("executor_svc.runner", reason="executor_svc.runner (torch) not importable")


async def test_tiny_model_streams_through_the_stack():
    runner = runner_mod.ModelRunner("tiny-llama", load_format="dummy", device="cpu", num_blocks=128)
    st = await start_stack([runner], overrides=("token_budget=64",))
    try:
        specs = {"a": (40, 6), "b": (40, 6), "c": (13, 9)}  # a and b: same prompt (greedy -> same tokens)
        results = await asyncio.wait_for(asyncio.gather(
            *[collect(st.stub, submit_msg(rid, p, m)) for rid, (p, m) in specs.items()]), 60)
        got = {rid: tokens_of(evs) for rid, evs in zip(specs, results)}
        for rid, (p, m) in specs.items():
            assert len(got[rid]) == m
            assert results[list(specs).index(rid)][-1].usage.completion_tokens == m
        assert got["a"] == got["b"]  # chunked (budget 64) and batched differently, same greedy tokens
        assert all(0 <= t < 32000 for t in got["c"])
        ex = st.dispatcher.executor_stats()[0]
        assert ex.num_running == 0 and ex.kv_used_fraction == 0.0 and ex.mean_batch_s > 0
    finally:
        await st.close()

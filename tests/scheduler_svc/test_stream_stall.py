"""A Submit client that stops reading: its stream is bounded, then the request is aborted and its KV freed."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import pytest

from executor_svc.fake_runner import fake_token
from scheduler_svc.__main__ import add_arguments, config_from_args
from scheduler_svc.core.request import Request
from scheduler_svc.core.token_event import TokenEvent
from scheduler_svc.dispatcher import RequestStream
from tests.scheduler_svc.helpers import RecordingRunner, collect, start_stack, stats, submit_msg, tokens_of, wait_for
from wire.pb.slai.v1 import common_pb2, scheduler_pb2_grpc

# NOTE: gRPC C-core grows a stream's receive window to megabytes (BDP probing) while the application does
# not read; a small fixed window makes this client's transport full after a few dozen events.
SMALL_WINDOW = (("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0))


def test_untaken_events_coalesce_into_one_with_the_clients_timings():
    s = RequestStream(Request("r", 4, 100, arrival_s=10.0))
    for k, t in enumerate((10.5, 10.6, 10.9, 11.0)):
        s.put(TokenEvent("r", (100 + k,), None, t, k == 0, 4, k + 1))
    assert s.num_pending_tokens == 4
    s.put(TokenEvent("r", (104,), "length", 11.2, False, 4, 5))
    got = asyncio.run(_drain(s))
    assert len(got) == 2  # one coalesced event, then the final one
    ev, final = got
    assert list(ev.token_ids) == [100, 101, 102, 103] and ev.finish_reason is None
    assert ev.is_first and abs(ev.ttft_s - 0.5) < 1e-9  # the first token's TTFT
    assert abs(ev.tbt_s - 0.3) < 1e-9  # the largest gap among the coalesced tokens
    assert ev.num_output_tokens == 4 and ev.time_s == 11.0
    assert final.token_ids == (104,) and final.finish_reason == "length" and abs(final.tbt_s - 0.2) < 1e-9
    assert s.num_pending_tokens == 0 and abs(s.max_tbt_s - 0.3) < 1e-9


async def _drain(s: RequestStream) -> list:
    out = []
    while not out or out[-1].finish_reason is None:
        out.append(await s.get())
    return out


async def test_a_client_that_stops_reading_is_aborted_and_its_kv_freed():
    runner = RecordingRunner()
    st = await start_stack([runner], stream_buffer_tokens=16, stream_stall_timeout_s=0.5)
    d = st.dispatcher
    slow = grpc.aio.insecure_channel(f"127.0.0.1:{st.scheduler.port}", options=SMALL_WINDOW)
    try:
        call = scheduler_pb2_grpc.SchedulerServiceStub(slow).Submit(submit_msg("stalled", 8, 4_000))
        first = await call.read()  # then this client reads nothing
        others = {f"ok{i}": 40 + 30 * i for i in range(3)}
        normal = asyncio.gather(*[collect(st.stub, submit_msg(rid, 8, n)) for rid, n in others.items()])

        await wait_for(lambda: d.num_stalled == 1, 30)
        assert "stalled" not in d.streams  # aborted in the core: KV freed, the executor told in the next plan
        await wait_for(lambda: "stalled" in runner.finished_ids(), 30)

        results = await asyncio.wait_for(normal, 30)
        for (rid, n), events in zip(others.items(), results):
            assert tokens_of(events) == [fake_token(rid, 8 + k, 32000) for k in range(n)]
            assert events[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        s = stats(d)["executors"][0]
        assert s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_used_fraction"] == 0.0

        # Reading again: what was generated before the abort, in order and coalesced, then the abort.
        events = [first]
        while (ev := await asyncio.wait_for(call.read(), 30)) is not grpc.aio.EOF:
            events.append(ev)
        toks = tokens_of(events)
        assert 16 <= len(toks) < 4_000
        assert toks == [fake_token("stalled", 8 + k, 32000) for k in range(len(toks))]
        assert events[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        assert events[-1].usage.completion_tokens == len(toks)
        assert any(len(ev.token_ids) > 1 for ev in events)  # the untaken events came coalesced
    finally:
        await slow.close()
        await st.close()


def test_stall_flags_are_checked_and_named():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--executors", "127.0.0.1:1"]
    config = config_from_args(parser.parse_args([*base, "--stream-buffer-tokens", "32", "--stream-stall-timeout", "0"]))
    assert (config.stream_buffer_tokens, config.stream_stall_timeout_s) == (32, 0.0)  # 0: never abort
    for flag, value in (("--stream-buffer-tokens", "0"), ("--stream-stall-timeout", "-1"),
                        ("--stream-stall-timeout", "nan")):
        with pytest.raises(ValueError, match=f"^{flag} must be"):
            config_from_args(parser.parse_args([*base, flag, value]))

"""Pool routing in the gateway (gateway/pools.py): two fake schedulers behind one gateway."""

from __future__ import annotations

import asyncio

import pytest

from gateway.pools import dns_name, resolve_pools
from wire.grpc_server import start_server
from wire.pb.slai.v1 import scheduler_pb2_grpc

from .conftest import FakeScheduler, start_stack


async def fake_pool(delay_s: float = 0.0) -> tuple[FakeScheduler, object]:
    fake = FakeScheduler(delay_s=delay_s)
    srv = await start_server([lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(fake, s)],
                             ["slai.v1.SchedulerService"], "127.0.0.1:0")
    return fake, srv


@pytest.fixture
async def two_pools(tiny_model_dir):
    made = []

    async def make(routing: str = "jsw", delay_s: float = 0.0):
        (fa, sa), (fb, sb) = await fake_pool(delay_s), await fake_pool(delay_s)
        pools = (f"127.0.0.1:{sa.port}", f"127.0.0.1:{sb.port}")
        st, _ = await start_stack(tiny_model_dir, scheduler_address=pools[0], pools=pools, pool_routing=routing)
        made.append((st, sa, sb))
        return st, (fa, sa), (fb, sb)

    yield make
    for st, sa, sb in made:
        await st.running.stop(0.5)
        await sa.stop(0)
        await sb.stop(0)


async def generate(st, n: int, max_tokens: int) -> list:
    from gateway.client import GatewayClient

    async with GatewayClient(st.grpc_address, timeout_s=30) as client:
        return await asyncio.gather(*(client.generate(f"hello {i}", max_tokens=max_tokens, ignore_eos=True)
                                      for i in range(n)))


@pytest.mark.parametrize("routing", ["jsw", "p2c", "round-robin"])
async def test_requests_spread_over_both_pools(two_pools, routing):
    st, (fa, _), (fb, _) = await two_pools(routing, delay_s=0.01)
    results = await generate(st, 16, 10)
    assert all(len(r.token_ids) == r.completion_tokens == 10 for r in results)
    assert fa.submits and fb.submits  # both pools got work
    assert len(fa.submits) + len(fb.submits) == 16


async def test_a_failed_pool_leaves_rotation_and_its_requests_continue_on_the_other(two_pools):
    st, (fa, sa), (fb, _) = await two_pools("round-robin", delay_s=0.01)
    task = asyncio.ensure_future(generate(st, 8, 60))
    # kill pool A once it has streamed tokens for its requests
    await asyncio.wait_for(_until(lambda: len(fa.submits) >= 4 and st.running.service.pools.pools[0].client.session
                                  .num_events >= 20), 10)
    await sa.stop(0)
    results = await asyncio.wait_for(task, 30)
    for r in results:
        assert r.finish_reason == "length"
        assert len(r.token_ids) == r.completion_tokens == 60  # nothing lost, nothing twice
    moved = [m for m in fb.submits if m.max_tokens < 60]
    assert moved  # continuations: prompt + streamed tokens, the rest of max_tokens
    for m in moved:
        assert len(m.prompt_token_ids) + m.max_tokens > 60
    assert st.running.service.pools.num_failovers == len(moved)
    assert not st.running.service.pools.pools[0].healthy
    before = len(fb.submits)
    await generate(st, 4, 3)  # new work goes to the survivor only
    assert len(fb.submits) == before + 4


async def test_a_rejecting_pool_sends_the_request_to_the_other(two_pools):
    st, (fa, _), (fb, _) = await two_pools("round-robin")
    fa.reject_retry_after_s = 2.0
    results = await generate(st, 4, 5)
    assert all(len(r.token_ids) == 5 for r in results)
    assert len(fb.submits) == 4 and fa.submits  # A refused its share; B ran everything


async def _until(pred) -> None:
    while not pred():
        await asyncio.sleep(0.01)


def test_resolve_pools():
    assert resolve_pools("10.0.0.1:5, 10.0.0.2:5") == ("10.0.0.1:5", "10.0.0.2:5")
    assert resolve_pools("127.0.0.1:7") == ("127.0.0.1:7",)
    assert resolve_pools("localhost:7") == ("localhost:7",)  # one address: the name stays
    for bad in ("", " , ", "nohost", "host:port"):
        with pytest.raises(ValueError, match="--pools"):
            resolve_pools(bad)


def test_dns_name_is_followed_only_for_one_name():
    assert dns_name("sched.pools.svc:50061") == "sched.pools.svc:50061"
    assert dns_name("10.0.0.1:5") is None and dns_name("[::1]:5") is None
    assert dns_name("a:1,b:2") is None and dns_name("unix:/tmp/s") is None


async def test_pools_follow_a_changing_address_list(tiny_model_dir):
    """A DNS name's addresses change (pools scaled): new ones join, gone ones leave the rotation."""
    from gateway.config import GatewayConfig
    from gateway.pools import PoolSet
    from gateway.scheduler_client import SchedulerClient

    config = GatewayConfig(model_dir=str(tiny_model_dir))
    make = lambda address: SchedulerClient(config, address=address)
    pools = PoolSet([make("10.9.0.1:1"), make("10.9.0.2:1")], "round-robin")
    pools.update(["10.9.0.2:1", "10.9.0.3:1"], make)
    assert [p.address for p in pools.pools] == ["10.9.0.2:1", "10.9.0.3:1"]
    assert {pools.pick().address for _ in range(4)} == {"10.9.0.2:1", "10.9.0.3:1"}
    pools.update([], make)  # an empty answer changes nothing
    assert len(pools.pools) == 2
    await pools.close()

"""API keys: the key file is followed while the gateway runs, and keys are matched by digest in constant time."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time

import grpc
import httpx
import pytest

from gateway.auth import Unauthenticated, key_digest, parse_key_data
from gateway.config import TIER_NAMES
from gateway.key_file import ReloadingKeyStore
from wire.pb.slai.v1 import gateway_pb2, gateway_pb2_grpc

from .conftest import start_stack

PAYING, FREE = TIER_NAMES["paying"], TIER_NAMES["free"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def replace(path, text: str) -> None:
    """Write next to ``path`` and rename over it (what the docs recommend; a new inode every time)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_changes_take_effect_at_the_next_check(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text("keys: {k-a: paying, k-b: free}\n")
    clock = Clock()
    store = ReloadingKeyStore(f, check_interval_s=1.0, clock=clock)
    assert store.resolve("Bearer k-a").tier == PAYING and store.resolve("k-b").tier == FREE

    replace(f, "keys: {k-b: paying}\ntiers: {paying: {tbt_slo_s: 0.2}}\n")  # revoke k-a, move k-b
    clock.now = 0.5
    assert store.resolve("k-a").tier == PAYING  # not checked yet: at most one stat per second
    clock.now = 1.0
    with pytest.raises(Unauthenticated, match="unknown API key"):
        store.resolve("k-a")
    policy = store.resolve("k-b")
    assert policy.tier == PAYING and policy.tbt_slo_s == pytest.approx(0.2)
    assert store.num_reloads == 1 and store.key_for_tier("paying") == "k-b"

    f.write_text("keys: {k-c: free, k-d: free}\n")  # rewritten in place (same inode)
    clock.now = 2.0
    assert store.resolve("k-c").tier == FREE and store.num_reloads == 2


@pytest.mark.parametrize("bad", ["keys: {k-secret-1234: paying\n",  # YAML syntax
                                 "keys: {k-x: platinum}\n",  # unknown tier
                                 "- just\n- a list\n",  # wrong shape
                                 ""])  # empty (a writer that truncated first)
def test_a_malformed_rewrite_keeps_the_old_keys(tmp_path, caplog, bad):
    f = tmp_path / "keys.yaml"
    f.write_text("keys: {k-a: paying, k-b: free}\n")
    clock = Clock()
    store = ReloadingKeyStore(f, check_interval_s=1.0, clock=clock)
    replace(f, bad)
    clock.now = 1.0
    with caplog.at_level(logging.ERROR, logger="gateway.key_file"):
        assert store.resolve("k-a").tier == PAYING and store.resolve("k-b").tier == FREE
        clock.now = 2.0
        store.resolve("k-a")  # the same broken file is not reported again
    assert store.num_reload_errors == 1 and store.num_reloads == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "keeping the 2 keys loaded before" in errors[0]
    assert "k-secret-1234" not in errors[0]  # a YAML error's snippet would print the file's text
    replace(f, "keys: {k-e: free}\n")  # the next good version is picked up
    clock.now = 3.0
    assert store.resolve("k-e").tier == FREE
    with pytest.raises(Unauthenticated):
        store.resolve("k-a")


def test_a_deleted_file_keeps_the_old_keys(tmp_path):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps({"k-a": "free"}))
    clock = Clock()
    store = ReloadingKeyStore(f, check_interval_s=1.0, clock=clock)
    f.unlink()
    clock.now = 1.0
    assert store.resolve("k-a").tier == FREE and store.num_reload_errors == 1


def test_a_malformed_file_at_start_is_fatal(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text("keys: {k-a: gold}\n")
    with pytest.raises(ValueError, match="unknown tier 'gold'"):
        ReloadingKeyStore(f)


def test_keys_are_looked_up_by_digest_and_confirmed_with_compare_digest(monkeypatch):
    store = parse_key_data({"sk-alpha-1": "free", "sk-beta-2": "paying"})
    # the index holds SHA-256 digests, never the secrets themselves, and repr shows no key
    assert set(store.by_digest) == {key_digest("sk-alpha-1"), key_digest("sk-beta-2")}
    assert all(len(d) == 32 for d in store.by_digest)
    assert "sk-alpha-1" not in repr(store)
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert store.resolve("Bearer sk-alpha-1").tier == FREE
    assert calls == [(key_digest("sk-alpha-1"), key_digest("sk-alpha-1"))]
    for near_miss in ("sk-alpha-", "sk-alpha-12", "SK-ALPHA-1", "sk-alpha-1\x00", "sk-beta-1"):
        calls.clear()
        with pytest.raises(Unauthenticated):
            store.resolve(near_miss)
        assert len(calls) == 1 and calls[0][1] == key_digest(near_miss)  # every answer goes through it


async def _wait_for(pred, timeout_s: float = 30.0) -> None:
    """Poll an async predicate; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_revoked_key_gets_401_without_a_restart(tiny_model_dir, tmp_path):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps({"k-a": "paying", "k-b": "free"}))
    keys = ReloadingKeyStore(f, check_interval_s=0.1)
    st, sched = await start_stack(tiny_model_dir, keys=keys)
    try:
        async with httpx.AsyncClient(base_url=st.http_base, timeout=10) as http:
            async def status(key: str) -> int:
                return (await http.get("/v1/models", headers={"authorization": f"Bearer {key}"})).status_code

            assert await status("k-a") == 200 and await status("k-b") == 200
            replace(f, json.dumps({"k-b": "free"}))

            async def revoked() -> bool:
                return await status("k-a") == 401
            await _wait_for(revoked)
            assert await status("k-b") == 200
            async with grpc.aio.insecure_channel(st.grpc_address) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
                            gateway_pb2.GenerateRequest(prompt="hi", max_tokens=2),
                            metadata=(("authorization", "Bearer k-a"),), timeout=10):
                        pass
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

            replace(f, "{not json")

            async def reload_failed() -> bool:
                return await status("k-b") == 200 and keys.num_reload_errors >= 1
            await _wait_for(reload_failed)
            assert await status("k-b") == 200 and await status("k-a") == 401  # the last good keys stay
    finally:
        await st.running.stop(0.2)
        await sched.stop(0)

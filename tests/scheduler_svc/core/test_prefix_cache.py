"""Prefix caching in the core (scheduler_svc/core/prefix_cache.py): hits, eviction, sharing rules.

``KvModel`` plays an executor that remembers what each KV slot holds: every token
a step computes is checked to attend over slots holding exactly its sequence's
earlier tokens (so a shared block really holds the prefix it is shared for), and a
step may only write into blocks no other live request holds.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.plan import BatchPlan, StepResult
from scheduler_svc.core import Request, RequestStatus, SchedulerConfig, make_core
from scheduler_svc.core.prefix_cache import ROOT_HASH, PrefixCachingAllocator

BS = 16


class KvModel:
    """An executor that tracks KV content per slot: ``slot -> tokens[:pos + 1]`` of its writer."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}
        self.reqs: dict[str, tuple[list[int], list[int], int]] = {}  # rid -> (tokens, blocks, computed)
        self.block_full: dict[int, tuple[int, ...]] = {}  # block -> the token prefix ending at its last slot
        self.now = 0.0  # the test clock (steps only move it forward)

    def run(self, plan: BatchPlan) -> StepResult:
        for rid in plan.finished_ids + plan.preempted_ids:
            del self.reqs[rid]
        for s in plan.new:
            self.reqs[s.req_id] = (list(s.token_ids), list(s.block_ids), s.num_computed_tokens)
        work = [(s.req_id, s.num_new_tokens, s.sample) for s in plan.new]
        for c in plan.cached:
            toks, blocks, computed = self.reqs[c.req_id]
            assert computed == c.num_computed_tokens
            blocks.extend(c.new_block_ids)
            work.append((c.req_id, c.num_new_tokens, c.sample))
        holders: dict[int, set[str]] = {}
        for rid, (_, blocks, _) in self.reqs.items():
            for b in blocks:
                holders.setdefault(b, set()).add(rid)
        ids, out = [], []
        for rid, n, sample in work:
            toks, blocks, start = self.reqs[rid]
            for p in range(start):  # attention reads the whole context from the cache
                assert self.slots.get((blocks[p // BS], p % BS)) == tuple(toks[:p + 1]), (rid, p, "stale KV")
            for p in range(start, start + n):
                b = blocks[p // BS]
                assert holders[b] == {rid}, f"{rid} writes block {b} held by {holders[b]}"
                self.slots[(b, p % BS)] = tuple(toks[:p + 1])
                if p % BS == BS - 1:
                    self.block_full[b] = tuple(toks[:p + 1])
                else:  # the block holds a different (partial) sequence now
                    self.block_full.pop(b, None)
            self.reqs[rid] = (toks, blocks, start + n)
            if sample:
                tok = (sum(toks[-3:]) * 31 + len(toks)) % 97 + 3  # depends on the sequence only
                ids.append(rid)
                out.append(tok)
                toks.append(tok)
        return StepResult(step_id=plan.step_id, req_ids=tuple(ids), token_ids=tuple(out))


def chain_hash(tokens: tuple[int, ...]) -> int:
    h = ROOT_HASH
    for i in range(0, len(tokens), BS):
        h = hash((h, tuple(tokens[i:i + BS])))
    return h


def check_table(core, kv: KvModel) -> None:
    """Consistency of the allocator, and every registered block holds the content its key names."""
    pc: PrefixCachingAllocator = core.prefix_cache
    if pc is None:
        core.allocator.check_invariants()
        return
    pc.check_invariants()
    for key, b in pc._table.items():
        content = kv.block_full.get(b)
        assert content is not None, f"block {b} registered but never written"
        assert content[-BS:] == key[1] and chain_hash(content) == hash(key), f"block {b} holds other tokens"


def make(num_blocks: int = 64, policy: str = "sarathi-fcfs", **cfg) -> object:
    base = {"token_budget": 64, "max_num_seqs": 8, "max_model_len": 1024}
    base.update(cfg)
    return make_core(policy, num_blocks=num_blocks, config=SchedulerConfig(**base))


def req(rid: str, tokens, max_tokens: int = 2) -> Request:
    return Request(rid, len(tokens), max_tokens, 0.0, prompt_token_ids=tuple(tokens))


def run_steps(core, kv: KvModel, n: int = 1000) -> None:
    for _ in range(n):
        if not core.has_work:
            break
        one_step(core, kv)


def one_step(core, kv: KvModel) -> BatchPlan:
    """One step on the kv model's clock (time only moves forward)."""
    now = kv.now
    plan = core.schedule(now)
    kv.now = now + 0.01
    core.update(plan, kv.run(plan), kv.now)
    check_table(core, kv)
    return plan


PREFIX = list(range(1000, 1064))  # four full blocks


def test_hit_and_miss_accounting():
    core, kv = make(), KvModel()
    core.add(req("a", PREFIX + [1, 2, 3, 4]), 0.0)
    run_steps(core, kv)
    b = req("b", PREFIX[:40] + [9] * 30)  # shares two full blocks and 8 tokens of the third
    core.add(b, 0.0)
    assert b.num_computed_tokens == 32 and core.num_waiting_tokens == 38  # seen as computed on arrival
    plan = one_step(core, kv)
    (s,) = plan.new
    assert (s.num_computed_tokens, s.num_new_tokens) == (32, 38) and plan.stats.num_prefill_tokens == 38
    pc = core.prefix_cache
    assert (pc.num_query_tokens, pc.num_hit_tokens) == (68 + 70, 32)
    run_steps(core, kv)
    c = req("c", [5] * 50)  # a miss
    core.add(c, 0.0)
    run_steps(core, kv)
    assert (pc.num_query_tokens, pc.num_hit_tokens) == (68 + 70 + 50, 32)


def test_fully_cached_block_aligned_prompt_recomputes_its_last_block():
    core, kv = make(), KvModel()
    core.add(req("a", PREFIX), 0.0)
    run_steps(core, kv)
    a_blocks = set(kv.block_full)
    core.add(req("b", PREFIX), 0.0)
    plan = one_step(core, kv)
    (s,) = plan.new
    assert (s.num_computed_tokens, s.num_new_tokens, s.sample) == (48, 16, True)
    assert s.block_ids[3] not in s.block_ids[:3] and s.block_ids[:3] == tuple(sorted(s.block_ids[:3]))
    assert set(s.block_ids[:3]) <= a_blocks
    run_steps(core, kv)


def test_no_hit_from_blocks_computed_in_the_same_step():
    core, kv = make(token_budget=256), KvModel()
    core.add(req("a", PREFIX + [1]), 0.0)
    core.add(req("b", PREFIX + [2]), 0.0)
    plan = one_step(core, kv)
    assert [s.num_computed_tokens for s in plan.new] == [0, 0]  # a's blocks are computed by this very step
    core.add(req("c", PREFIX + [3]), 0.0)
    plan = one_step(core, kv)
    assert [s.num_computed_tokens for s in plan.new] == [64]
    run_steps(core, kv)


def test_lru_eviction_under_memory_pressure_keeps_the_prefix_being_reused():
    core, kv = make(num_blocks=8, max_num_seqs=1), KvModel()
    pc = core.prefix_cache
    core.add(req("a", PREFIX, max_tokens=1), 0.0)  # 4 blocks, all registered
    run_steps(core, kv)
    assert pc.num_used_blocks == 0 and pc.num_free_blocks == 8 and pc.num_cached_blocks == 4
    core.add(req("b", [7] * 80, max_tokens=1), 0.0)  # 5 blocks: 4 never-cached + evicts a's LAST block
    run_steps(core, kv)
    assert pc.num_evictions == 1
    c = req("c", PREFIX[:48] + [8] * 40, max_tokens=1)  # hits a's 3 remaining blocks (in the free queue)
    core.add(c, 0.0)
    plan = one_step(core, kv)
    (s,) = plan.new
    assert s.num_computed_tokens == 48
    assert all(kv.block_full[b] == tuple(PREFIX[:16 * (i + 1)]) for i, b in enumerate(s.block_ids[:3]))
    assert pc.num_evictions == 4  # its 3 fresh blocks evicted b's (least recently used) blocks
    run_steps(core, kv)


def test_a_referenced_block_is_never_evicted():
    core, kv = make(num_blocks=10, max_num_seqs=4), KvModel()
    core.add(req("a", PREFIX + [1], max_tokens=200), 0.0)
    one_step(core, kv)  # a prefills and keeps decoding: its blocks stay referenced
    core.add(req("b", [6] * 70, max_tokens=1), 0.0)
    run_steps(core, kv, n=30)  # the pool runs dry: b waits or a is preempted, never a stale read
    assert core.num_preemptions >= 0


def test_preemption_drops_references_and_the_recompute_hits_again():
    core, kv = make(token_budget=256), KvModel()
    a, b = req("a", PREFIX + [1] * 5, max_tokens=50), req("b", PREFIX + [2] * 5, max_tokens=50)
    core.add(a, 0.0)
    one_step(core, kv)
    core.add(b, 0.0)
    one_step(core, kv)
    shared = set(core.allocator.block_table("a")[:4])
    assert shared == set(core.allocator.block_table("b")[:4])
    core.preempt(b, 0.0)
    assert shared <= set(core.allocator.block_table("a"))  # still held by a
    core.prefix_cache.check_invariants()
    plan = one_step(core, kv)
    new = {s.req_id: s for s in plan.new}
    assert new["b"].num_computed_tokens >= 64  # prompt (and full output blocks) from the cache
    run_steps(core, kv)
    assert b.num_output_tokens == 50 and core.allocator.num_used_blocks == 0


def test_abort_mid_prefill_leaves_only_computed_blocks_cached():
    core, kv = make(token_budget=32), KvModel()
    long = list(range(2000, 2100))
    a = req("a", long)
    core.add(a, 0.0)
    one_step(core, kv)  # a's first 32 tokens: two full blocks
    core.abort("a", 0.01)
    b = req("b", long)
    core.add(b, 0.0)
    assert b.num_computed_tokens == 32  # exactly what a computed before the abort
    run_steps(core, kv)
    assert core.allocator.num_used_blocks == 0


def test_executor_death_with_shared_blocks_resubmits_and_resets_the_table():
    core, kv = make(token_budget=256), KvModel()
    for i in range(3):
        core.add(req(f"r{i}", PREFIX + [i] * 9, max_tokens=6), 0.0)
        one_step(core, kv)
    assert core.prefix_cache.num_hit_tokens == 2 * 64
    taken = core.take_back_all(1.0)  # the executor died holding shared blocks
    pc = core.prefix_cache
    pc.check_invariants()
    assert pc.num_used_blocks == 0 and pc.num_cached_blocks == 0 and not pc.match(req("x", PREFIX + [0]))
    other, kv2 = make(token_budget=256), KvModel()  # another executor's core: the requests continue there
    for old in taken:  # one per step: blocks a step computes are shared from the next step on
        ids = old.all_token_ids()
        other.add(Request(old.req_id, len(ids), old.max_tokens - old.num_output_tokens, 0.0,
                          prompt_token_ids=ids), 1.0)
        one_step(other, kv2)
    run_steps(other, kv2)
    assert other.prefix_cache.num_hit_tokens > 0 and other.allocator.num_used_blocks == 0


def test_caching_off_and_length_only_requests_never_touch_the_table():
    core, kv = make(enable_prefix_caching=False), KvModel()
    assert core.prefix_cache is None
    core.add(req("a", PREFIX + [1]), 0.0)
    run_steps(core, kv)
    core.add(req("b", PREFIX + [2]), 0.0)
    assert one_step(core, kv).new[0].num_computed_tokens == 0
    on = make()
    on.add(Request("c", 80, 2, 0.0), 0.0)  # the simulator's paper trace: no token ids
    plan = on.schedule(0.0)
    assert plan.new[0].block_ids == (0, 1, 2, 3, 4) and on.prefix_cache.num_query_tokens == 0


def test_bad_config_value_is_a_clear_error():
    with pytest.raises(ValueError, match="enable_prefix_caching expects true/false"):
        SchedulerConfig().with_overrides(["enable_prefix_caching=maybe"])


# ---------------------------------------------------------------- property test
ops = st.lists(st.tuples(st.sampled_from(["add", "add", "step", "step", "step", "abort", "preempt", "die"]),
                         st.integers(0, 3), st.integers(1, 90), st.integers(1, 12)), min_size=5, max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(8, 24), policy=st.sampled_from(["sarathi-fcfs", "slai", "vllm", "rad"]))
def test_random_add_abort_preempt_finish_keeps_the_table_consistent(ops, num_blocks, policy):
    core, kv = make(num_blocks=num_blocks, policy=policy, token_budget=48, max_model_len=num_blocks * BS), KvModel()
    prefixes = [list(range(100 * k + 1, 100 * k + 1 + 50)) for k in range(4)]
    rng = random.Random(len(ops))
    now, n = 0.0, 0
    for op, k, length, max_tokens in ops:
        if op == "add":
            n += 1
            toks = prefixes[k][:length] + [5000 + n] * max(0, length - 50)
            ev = core.add(req(f"q{n}", toks or [1], max_tokens), now)
            assert ev is None or ev.finish_reason == "ignored"
        elif op == "step" and core.has_work:
            one_step(core, kv)
            now = kv.now
        elif op == "abort" and core.requests:
            core.abort(rng.choice(sorted(core.requests)), now)
        elif op == "preempt" and core.running:
            core.preempt(core.running[rng.choice(sorted(core.running))], now)
        elif op == "die":
            core.take_back_all(now)
            kv = KvModel()
            kv.now = now
        check_table(core, kv)
        assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.RUNNING)
                   for r in core.requests.values())
    run_steps(core, kv)
    assert not core.requests and core.allocator.num_used_blocks == 0


def test_a_request_wanting_prompt_logprobs_computes_its_whole_prompt():
    """Prompt logprobs need every prompt position computed (issue 15): no hit, as in vLLM."""
    from contract.sampling import SamplingParams

    core, kv = make(enable_prefix_caching=True), KvModel()
    core.add(req("a", PREFIX + [1, 2]), 0.0)
    run_steps(core, kv)
    b = Request("b", len(PREFIX) + 2, 2, 0.0, prompt_token_ids=tuple(PREFIX + [1, 2]),
                sampling=SamplingParams(prompt_logprobs=0))
    core.add(b, 0.0)
    plan = one_step(core, kv)
    assert [(s.req_id, s.num_computed_tokens) for s in plan.new] == [("b", 0)]
    c = req("c", PREFIX + [1, 2])  # others still hit
    core.add(c, 0.0)
    assert c.num_computed_tokens == 64

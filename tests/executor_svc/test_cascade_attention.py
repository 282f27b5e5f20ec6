"""Cascade attention for decodes that share prefix blocks (executor_svc/attention.py, docs/executor.md).

Three levels: the attention function against a float64 softmax over each decode's
whole context (fp32 and bf16 tolerances); the runner's grouping (which decodes
share how many blocks); and greedy outputs through the scheduler's prefix cache,
with the cascade on and off and without any sharing, which must all be equal.
"""

from __future__ import annotations

import random

import pytest
import torch

from executor_svc import attention
from executor_svc.attention import PagedStep, PrefixGroup, paged_attention_forward
from executor_svc.kv_cache import KVCache, KVShape
from scheduler_svc.core import Request, SchedulerConfig, make_core
from tests.executor_svc.helpers import random_prompt
from tests.executor_svc.test_prefix_caching import drive

BS = 16


class _Layer(torch.nn.Module):
    layer_idx = 0


def _case(dtype: torch.dtype, seed: int = 0):
    """Decodes in two prefix groups plus two loners, contexts of unequal length, blocks scattered
    except group a's prefix, which lies in consecutive blocks 40-44 (the runner reads those in place).

    Returns (kv, q, k_new, v_new, write_slots, tables, lengths, groups as (rows, shared blocks)).
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_kv, n_rep, head_dim = 2, 3, 32
    kv = KVCache(KVShape(1, num_kv, head_dim, BS, dtype), num_blocks=96)
    kv.k.copy_(torch.randn(kv.k.shape, generator=gen))
    kv.v.copy_(torch.randn(kv.v.shape, generator=gen))
    prefix_a = list(range(40, 45))
    free = [b for b in range(1, 96) if b not in prefix_a]
    rng.shuffle(free)
    prefix_b = [free.pop() for _ in range(2)]
    # (shared prefix, context length incl. the new token): group a = rows 0-2, group b = rows 4-5, and a
    # loner between them (the runner packs groups first, but the attention must not rely on it)
    spec = [(prefix_a, 81), (prefix_a, 100), (prefix_a, 130), ([], 45), (prefix_b, 33), (prefix_b, 70), ([], 17)]
    tables, lengths = [], []
    for prefix, length in spec:
        tables.append(prefix + [free.pop() for _ in range(-(-length // BS) - len(prefix))])
        lengths.append(length)
    batch = len(spec)
    q = (torch.randn(num_kv * n_rep, batch, head_dim, generator=gen) * 2).to(dtype)
    k_new = torch.randn(num_kv, batch, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(num_kv, batch, head_dim, generator=gen).to(dtype)
    write = torch.tensor([t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, lengths)])
    return kv, q, k_new, v_new, write, tables, lengths, [((0, 3), 5), ((4, 6), 2)]


def _slots(table: list[int], start: int, end: int) -> list[int]:
    return [table[p // BS] * BS + p % BS for p in range(start, end)]


def _step(kv, write, tables, lengths, groups, in_place: bool) -> PagedStep:
    """The PagedStep the runner builds: each grouped decode gathers only the keys after its group's prefix;
    ``in_place``: a prefix in consecutive blocks is read as a view of the cache."""
    skip = [0] * len(tables)
    step = PagedStep(kv=kv, backend="sdpa", write_slots=write, num_decodes=len(tables))
    for (start, end), shared in groups:
        blocks = tables[start][:shared]
        first = blocks[0] * BS if in_place and blocks == list(range(blocks[0], blocks[0] + shared)) else None
        step.decode_groups.append(PrefixGroup(start, end, torch.tensor(_slots(tables[start], 0, shared * BS)), first))
        skip[start:end] = [shared * BS] * (end - start)
    own = [_slots(t, s, n) for t, s, n in zip(tables, skip, lengths)]
    width = max(map(len, own))
    step.decode_slots = torch.tensor([o + [0] * (width - len(o)) for o in own])
    step.decode_mask = (torch.arange(width)[None, :] < torch.tensor([len(o) for o in own])[:, None])[:, None, None]
    return step


def _reference(kv, q, tables, lengths, scaling) -> torch.Tensor:
    """float64 softmax(q k^T) v over each decode's whole context, read from the cache: [B, H, D]."""
    n_rep = q.shape[0] // kv.k.shape[1]
    out = []
    for b, (t, n) in enumerate(zip(tables, lengths)):
        idx = torch.tensor(_slots(t, 0, n))
        k = kv.k[0][:, idx].double().repeat_interleave(n_rep, 0)  # [H, n, D]
        v = kv.v[0][:, idx].double().repeat_interleave(n_rep, 0)
        p = torch.softmax((q[:, b : b + 1].double() @ k.transpose(1, 2)) * scaling, dim=-1)
        out.append((p @ v)[:, 0])
    return torch.stack(out)


def _count_cascades(monkeypatch) -> list[int]:
    """Counts calls of the cascade merge, so a test knows the path it checks ran."""
    calls: list[int] = []
    real = attention._cascade
    monkeypatch.setattr(attention, "_cascade", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize(("in_place", "one_group"), [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_cascade_equals_plain_attention_and_a_float64_reference(dtype, atol, in_place, one_group, monkeypatch):
    """Two groups (3 and 2 members, prefixes of 5 and 2 blocks: both padded in the batch) with a loner
    between them, or group a alone (its prefix read in place when ``in_place``)."""
    kv, q, k_new, v_new, write, tables, lengths, groups = _case(dtype)
    if one_group:
        groups = groups[:1]
    scaling = q.shape[-1] ** -0.5
    calls = _count_cascades(monkeypatch)
    outs = {}
    for name, grp in (("cascade", groups), ("plain", [])):
        before = len(calls)
        out, _ = paged_attention_forward(_Layer(), q[None], k_new[None], v_new[None], None,
                                         scaling=scaling, paged=_step(kv, write, tables, lengths, grp, in_place))
        assert (len(calls) > before) == bool(grp)  # the path under test ran, and only there
        outs[name] = out[0].double()  # [B, H, D]
    ref = _reference(kv, q, tables, lengths, scaling)  # after the writes: the new tokens' KV is in the cache
    assert torch.allclose(outs["plain"], ref, atol=atol, rtol=0)
    assert torch.allclose(outs["cascade"], ref, atol=atol, rtol=0)
    assert torch.allclose(outs["cascade"], outs["plain"], atol=atol, rtol=0)


def test_runner_groups_decodes_by_their_shared_leading_blocks(make_runner, monkeypatch):
    """Which decodes the runner puts in a cascade group, and with how many shared blocks."""
    from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice

    runner = make_runner(num_blocks=64, cascade_min_saved_tokens=0, cpu_kernels=False)
    seen: list[PagedStep] = []
    real = attention._decode_attention

    def spy(step, *a, **kw):
        if not seen or seen[-1] is not step:  # once per step, not per layer
            seen.append(step)
        return real(step, *a, **kw)

    monkeypatch.setattr(attention, "_decode_attention", spy)

    def new(rid, prompt, blocks, computed):
        return NewRequestSlice(req_id=rid, token_ids=tuple(prompt), num_tokens=len(prompt), block_ids=tuple(blocks),
                               num_computed_tokens=computed, num_new_tokens=len(prompt) - computed, sample=True)

    def decode_all(step_id: int, computed: dict[str, int]) -> PagedStep:
        seen.clear()
        runner.execute(BatchPlan(step_id=step_id, cached=tuple(
            CachedRequestSlice(req_id=r, num_computed_tokens=n, num_new_tokens=1, is_decode=True, sample=True)
            for r, n in computed.items())))
        (step,) = seen
        return step

    base = random_prompt(3, 70)
    # a owns blocks 0-4; b shares 3 of them, c 4, d only block 0; e shares nothing
    runner.execute(BatchPlan(step_id=0, new=(new("a", base, [0, 1, 2, 3, 4], 0),)))
    runner.execute(BatchPlan(step_id=1, new=(new("b", base[:48] + random_prompt(4, 20), [0, 1, 2, 5, 6], 48),
                                              new("c", base[:64] + random_prompt(5, 9), [0, 1, 2, 3, 7], 64),
                                              new("d", base[:16] + random_prompt(6, 40), [0, 8, 9, 10], 16),
                                              new("e", random_prompt(7, 30), [11, 12], 0))))
    computed = {"a": 70, "b": 68, "c": 73, "d": 56, "e": 30}
    step = decode_all(2, computed)
    # a, b, c, d start with block 0; the run all four share is that one block (d diverges after it)
    assert [(g.start, g.end, g.slots.tolist()) for g in step.decode_groups] == [(0, 4, list(range(BS)))]
    # each gathers its keys after the prefix (c: 74 - 16 the widest), e its whole context
    assert step.decode_slots.shape == (5, 74 - BS)
    # a threshold above the (4 - 1) x 16 tokens the group saves: nothing is grouped
    runner.cascade_min_saved_tokens = 3 * BS + 1
    step = decode_all(3, {r: n + 1 for r, n in computed.items()})
    assert step.decode_groups == [] and step.decode_slots.shape == (5, 75)


def _shared_prefix_arrivals(n: int = 5) -> list[tuple[int, Request]]:
    """n requests on one 100-token prefix with their own tails; the first computes it, the rest hit the cache."""
    base = random_prompt(11, 100)
    out = []
    for i in range(n):
        ids = tuple(base + random_prompt(20 + i, 5 + 9 * i))
        out.append((0 if i == 0 else 4, Request(f"r{i}", len(ids), 10, 0.0, prompt_token_ids=ids)))
    return out


def test_greedy_outputs_equal_with_and_without_prefix_sharing(make_runner, monkeypatch):
    """Prefix caching off (no shared blocks), on with the cascade, on without it: the same greedy tokens."""
    calls = _count_cascades(monkeypatch)
    outs = {}
    for name, caching, cascade in (("plain", False, True), ("cascade", True, True), ("no-cascade", True, False)):
        cfg = SchedulerConfig(enable_prefix_caching=caching, token_budget=64, max_model_len=512)
        core = make_core("sarathi-fcfs", num_blocks=64, config=cfg)
        runner = make_runner(num_blocks=64, cascade_attention=cascade, cascade_min_saved_tokens=0, cpu_kernels=False)
        before = len(calls)
        outs[name], plans = drive(core, runner, _shared_prefix_arrivals())
        assert (len(calls) > before) == (name == "cascade"), name  # only the shared run took the cascade
        if caching:
            assert any(s.num_computed_tokens == 96 for p in plans for s in p.new)
    assert outs["cascade"] == outs["plain"] == outs["no-cascade"]
    assert all(len(o) == 10 for o in outs["plain"].values())


@pytest.mark.parametrize("flags", [[], ["--scatter-blocks"], ["--no-cascade"]])
def test_executor_sweep_places_decodes_on_shared_prefixes(tmp_path, monkeypatch, flags):
    """``benchmarks.executor_sweep --shared-prefix``: the decodes it places share blocks, so the cascade runs
    (unless ``--no-cascade``), and the sweep's rows come out."""
    import argparse
    import csv

    from benchmarks import executor_sweep as bench

    calls = _count_cascades(monkeypatch)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-mistral", "--prefill-tokens", "0", "--decodes", "4", "--contexts", "304",
                              "--shared-prefix", "288", "--prefix-groups", "2", "--repeats", "2", "--warmup", "0",
                              "--batches", "", "--out", str(tmp_path), "--no-cpu-kernels", *flags])
    assert bench.run(args) == 0
    rows = list(csv.DictReader((tmp_path / "steps.csv").open()))
    assert [int(r["num_decodes"]) for r in rows] == [4, 4]
    assert bool(calls) == ("--no-cascade" not in flags)
    with pytest.raises(SystemExit, match="multiple of 16"):
        bench.run(parser.parse_args(["--model", "tiny-mistral", "--prefill-tokens", "0", "--decodes", "2",
                                     "--contexts", "64", "--shared-prefix", "40", "--batches", "",
                                     "--out", str(tmp_path)]))

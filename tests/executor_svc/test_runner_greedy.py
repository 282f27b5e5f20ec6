"""Token-for-token equality of the paged runner with ``model.generate`` (tiny random model)."""

from __future__ import annotations

import pytest
import torch

from tests.executor_svc.helpers import MAX_NEW, Driver, same_prefix


def _check(done: dict[str, list[int]], references: dict[str, list[int]]) -> None:
    assert set(done) == set(references)
    for rid, ref in references.items():
        assert same_prefix(done[rid], ref), f"{rid}: runner {done[rid]} != generate {ref}"


def test_whole_prompts_in_one_batch(make_runner, prompts, references):
    drv = Driver(make_runner(), num_blocks=64)
    for rid, p in prompts.items():
        drv.add(rid, p, MAX_NEW)
    _check(drv.run(), references)


@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_prefill_mixed_with_decodes(make_runner, prompts, references, chunk):
    """Staggered arrivals: every step mixes prefill chunks of some requests with
    decodes of others; chunks cross block boundaries at odd offsets (chunk=7)."""
    drv = Driver(make_runner(), num_blocks=64)
    pending = list(prompts.items())
    while pending or drv.reqs:
        if pending:
            rid, p = pending.pop(0)
            drv.add(rid, p, MAX_NEW)
        drv.step(chunk=chunk)
    _check(drv.done, references)


def test_recompute_after_preemption(make_runner, prompts, references):
    """Preempt mid-decode; the request returns as new with prompt + outputs."""
    drv = Driver(make_runner(), num_blocks=64)
    for rid, p in prompts.items():
        drv.add(rid, p, MAX_NEW)
    drv.step()  # prefills + first tokens
    drv.step()
    drv.step()
    drv.preempt("p40")
    drv.preempt("p5")
    drv.step(chunk=24)  # p40 (42 tokens now) comes back in two chunks; others decode
    drv.preempt("p17")  # preempt again right after
    _check(drv.run(chunk=24), references)


def test_scrambled_blocks_give_same_tokens(make_runner, prompts, references):
    """Non-contiguous, shuffled block placement must not change any token."""
    drv = Driver(make_runner(num_blocks=96), num_blocks=96, shuffle_blocks=1234)
    for rid, p in prompts.items():
        drv.add(rid, p, MAX_NEW)
    _check(drv.run(chunk=13), references)


def test_batch_mates_do_not_leak(make_runner, prompts):
    """A request alone and the same request in a full batch produce the same tokens
    (interleaved blocks: each request's neighbours hold the other's KV)."""
    alone = Driver(make_runner(), num_blocks=64)
    alone.add("x", prompts["p40"], MAX_NEW)
    solo = alone.run()["x"]
    both = Driver(make_runner(), num_blocks=64)
    both.add("x", prompts["p40"], MAX_NEW)
    both.add("y", prompts["p64"], MAX_NEW)
    both.add("z", prompts["p17"], MAX_NEW)
    assert both.run(chunk=16)["x"] == solo


def test_step_result_shape_and_timings(make_runner, prompts):
    drv = Driver(make_runner(), num_blocks=64)
    drv.add("a", prompts["p17"], 2)
    drv.add("b", prompts["p64"], 2)
    plan = drv.plan(chunk=32)  # a completes (samples), b does not
    result = drv.runner.execute(plan)
    assert result.req_ids == ("a",) and len(result.token_ids) == 1
    assert result.step_id == plan.step_id
    assert 0 < result.forward_ns <= result.total_ns
    assert result.prepare_ns + result.forward_ns + result.sample_ns <= result.total_ns
    info = drv.runner.info()
    assert (info.attention_backend, info.block_size, info.num_blocks, info.vocab_size) == ("sdpa", 16, 64, 32000)


def test_step_without_sampling(make_runner, prompts, references):
    """A step of partial prefill chunks only samples nothing and still computes KV."""
    drv = Driver(make_runner(), num_blocks=64)
    drv.add("p64", prompts["p64"], MAX_NEW)
    result = drv.step(chunk=10)
    assert result.req_ids == () and result.token_ids == ()
    assert same_prefix(drv.run(chunk=10)["p64"], references["p64"])


def _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """flash_attn_varlen_func semantics in plain torch (bottom-right causal)."""
    import torch.nn.functional as F

    assert causal and q.dim() == 3 and k.dim() == 3 and k.is_contiguous()
    out = torch.empty_like(q)
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        n, total = qe - qs, ke - ks
        assert n <= max_seqlen_q and total <= max_seqlen_k
        mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=total - n)
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None],
                                           v[ks:ke].transpose(0, 1)[None], attn_mask=mask, scale=softmax_scale,
                                           enable_gqa=True)
        out[qs:qe] = o[0].transpose(0, 1)
    return out


def test_flash_attn_packing_with_reference_kernel(make_runner, prompts, references, monkeypatch):
    """The flash-attn path's inputs (cu_seqlens, gathered keys, layouts) are right:
    run it on CPU with a plain-torch stand-in for flash_attn_varlen_func."""
    from executor_svc import attention
    monkeypatch.setattr(attention, "flash_attn_varlen_func", _varlen_reference)
    runner = make_runner()
    runner.backend = "flash-attn"  # NOTE: bypasses select_backend, which needs CUDA
    drv = Driver(runner, num_blocks=64, shuffle_blocks=9)
    pending = list(prompts.items())
    while pending or drv.reqs:
        if pending:
            rid, p = pending.pop(0)
            drv.add(rid, p, MAX_NEW)
        drv.step(chunk=11)
    _check(drv.done, references)


def test_small_steps_run_on_small_step_threads(make_runner):
    """Steps under SMALL_STEP_TOKENS use ``small_step_threads``, larger ones ``num_threads``, set in the
    thread that runs the step (torch's thread count is per OpenMP calling thread)."""
    from executor_svc.runner import SMALL_STEP_TOKENS
    from tests.executor_svc.helpers import random_prompt

    before = torch.get_num_threads()
    try:
        runner = make_runner(num_blocks=64, num_threads=2, small_step_threads=1)
        seen: list[tuple[int, int]] = []  # (tokens in the step, threads during its forward)
        forward = runner.model.forward

        def recording(*args, **kw):
            seen.append((kw["input_ids"].shape[1], torch.get_num_threads()))
            return forward(*args, **kw)

        runner.model.forward = recording
        drv = Driver(runner, num_blocks=64)
        drv.add("long", random_prompt(5, SMALL_STEP_TOKENS + 44), 3)
        drv.add("short", random_prompt(6, 9), 3)
        drv.run()
        assert seen[0] == (SMALL_STEP_TOKENS + 44 + 9, 2)  # both prompts in one big step
        assert seen[1:] and all(n < SMALL_STEP_TOKENS and t == 1 for n, t in seen[1:])  # decodes
        with pytest.raises(ValueError, match="small_step_threads"):
            make_runner(small_step_threads=0)
    finally:
        torch.set_num_threads(before)

"""The C++ kernels (executor_svc/cpu_kernels): paged decode attention against an fp64 reference, the
elementwise kernels against the torch modules they replace, the runner with and without them, and the
fallback where they cannot be built."""

from __future__ import annotations

import pytest
import torch

from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice
from executor_svc import cpu_kernels
from tests.executor_svc.helpers import random_prompt


@pytest.fixture(scope="module")
def kernel():
    k = cpu_kernels.load()
    if k is None:
        pytest.skip(f"C++ kernel unavailable here: {cpu_kernels.unavailable_reason()}")
    return k


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader as before its first call, building into an empty cache folder."""
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpu_kernels, "_reason", None)
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "kernels"))
    return tmp_path


def _case(seed, dtype, batch, num_kv, n_rep, dim, block_size, num_blocks=64):
    """Random cache, scattered block tables (padded with block 0 past each decode's blocks) and lengths."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_kv, num_blocks * block_size, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_kv, num_blocks * block_size, dim, generator=g).to(dtype)
    lengths = torch.randint(1, 6 * block_size, (batch,), generator=g, dtype=torch.int32)
    lengths[0] = 1  # a decode whose only key is its own new token
    max_nb = -(-int(lengths.max()) // block_size)
    tables = torch.zeros(batch, max_nb, dtype=torch.int32)
    for b in range(batch):
        nb = -(-int(lengths[b]) // block_size)
        tables[b, :nb] = torch.randperm(num_blocks, generator=g)[:nb].to(torch.int32)
    # the runner's layout: q is a [B, H, D] transposed view of [H, T, D], T > B
    q = torch.randn(num_kv * n_rep, batch + 3, dim, generator=g).to(dtype)[:, :batch].transpose(0, 1)
    return q, k_cache, v_cache, tables, lengths


def _reference(q, k_cache, v_cache, tables, lengths, block_size, scale):
    batch, heads, dim = q.shape
    n_rep = heads // k_cache.shape[0]
    out = torch.empty(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        slots = (tables[b].long()[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n]
        for h in range(heads):
            k = k_cache[h // n_rep, slots].double()
            v = v_cache[h // n_rep, slots].double()
            out[b, h] = torch.softmax(q[b, h].double() @ k.T * scale, dim=-1) @ v
    return out


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_kv,n_rep,dim,block_size", [(3, 3, 64, 16), (2, 1, 32, 4), (1, 4, 128, 16), (1, 6, 64, 16)])
def test_kernel_matches_an_fp64_softmax_attention(kernel, dtype, atol, num_kv, n_rep, dim, block_size):
    q, k_cache, v_cache, tables, lengths = _case(0, dtype, 7, num_kv, n_rep, dim, block_size)
    scale = dim ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    kernel.paged_decode(q, k_cache, v_cache, tables, lengths, block_size, scale, out)
    want = _reference(q, k_cache, v_cache, tables, lengths, block_size, scale)
    assert torch.allclose(out.double(), want, atol=atol, rtol=0), (out.double() - want).abs().max()
    # a decode with one key attends only to it: its value, rounded once
    assert torch.equal(out[0], v_cache[torch.arange(num_kv).repeat_interleave(n_rep),
                                       int(tables[0, 0]) * block_size])


def test_kernel_uses_every_thread_it_is_given(kernel):
    q, k_cache, v_cache, tables, lengths = _case(1, torch.bfloat16, 16, 3, 3, 64, 16)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(kernel.paged_decode(q, k_cache, v_cache, tables, lengths, 16, 0.125, torch.empty(q.shape, dtype=q.dtype)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])  # each (decode, KV head) is computed alone: no reduction order changes


def test_kernel_refuses_layouts_it_would_misread(kernel):
    q, k_cache, v_cache, tables, lengths = _case(2, torch.float32, 3, 2, 2, 32, 16)
    out = torch.empty(q.shape)
    with pytest.raises(ValueError, match="paged_decode"):
        kernel.paged_decode(q, k_cache, v_cache, tables.long(), lengths, 16, 0.1, out)  # int64 tables
    with pytest.raises(ValueError, match="paged_decode"):
        kernel.paged_decode(q, k_cache.transpose(0, 1).contiguous().transpose(0, 1), v_cache, tables, lengths, 16,
                            0.1, out)
    with pytest.raises(ValueError, match="paged_decode"):
        kernel.paged_decode(q.to(torch.bfloat16), k_cache, v_cache, tables, lengths, 16, 0.1, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers_module(kernel, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(3)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    x = (3 * torch.randn(1, 40, 96, generator=g)).to(dtype)[:, 5:]  # a strided view, as the runner's rows can be
    got = kernel.rms_norm(x, norm.weight, norm.variance_epsilon)
    want = norm(x)
    assert got.shape == want.shape and got.dtype == dtype
    # the same formula rounded at the same places; only the fp32 sum of squares is added in another order,
    # which can move a bf16 result by one unit in the last place
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0, "rtol": 2 ** -7}
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch(kernel, dtype):
    g = torch.Generator().manual_seed(4)
    gate_up = (4 * torch.randn(2, 9, 2 * 200, generator=g)).to(dtype)  # 200: not a multiple of the 64-wide chunks
    got = kernel.silu_and_mul(gate_up)
    want = torch.nn.functional.silu(gate_up[..., :200]) * gate_up[..., 200:]
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0, "rtol": 2 ** -7}
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_and_rope_match_transformers(kernel, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    g = torch.Generator().manual_seed(8)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0, "rtol": 2 ** -7}
    norm = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
    x = torch.randn(9, 64, generator=g).to(dtype)
    y = torch.randn(9, 3 * 64, generator=g).to(dtype)[:, 64:128]  # a column slice, as o_proj's rows can be
    want_sum = x + y
    got = kernel.add_rms_norm(x, y, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(x, want_sum, atol=0, rtol=0)  # the residual stream, updated in place
    torch.testing.assert_close(got, norm(want_sum), **tol)
    # rotary embedding in place on q of a fused [T, (H + 2 KV) * D] product
    qkv = torch.randn(9, (4 + 2 * 2) * 16, generator=g).to(dtype)
    q = qkv[:, : 4 * 16].view(9, 4, 16)
    cos, sin = torch.randn(9, 16, generator=g).to(dtype), torch.randn(9, 16, generator=g).to(dtype)
    want_q, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos[None], sin[None])
    kernel.rope(q, cos, sin)
    torch.testing.assert_close(q.transpose(0, 1), want_q[0], **tol)


def test_kv_write_places_every_token_at_its_slot(kernel):
    g = torch.Generator().manual_seed(5)
    k_cache, v_cache = torch.zeros(3, 64, 8, dtype=torch.bfloat16), torch.zeros(3, 64, 8, dtype=torch.bfloat16)
    slots = torch.randperm(64, generator=g)[:10]
    # the runner's shapes: key [KV, T, D] transposed from [T, KV, D]; value a column slice of a wider product
    key = torch.randn(10, 3, 8, generator=g).to(torch.bfloat16).transpose(0, 1)
    value = torch.randn(10, 5 * 8, generator=g).to(torch.bfloat16)[:, 8:32].reshape(10, 3, 8).transpose(0, 1)
    kernel.kv_write(k_cache, v_cache, slots, key, value)
    want_k, want_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    want_k.index_copy_(1, slots, key)
    want_v.index_copy_(1, slots, value)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(ValueError, match="kv_write"):
        kernel.kv_write(k_cache, v_cache, slots.int(), key, value)


def test_bf16_runner_swaps_norms_and_activation_for_the_kernels(kernel):
    from executor_svc import models
    from executor_svc.kernel_modules import KernelRMSNorm
    from executor_svc.packed_linears import FusedGateUpMLP, packing_supported
    from executor_svc.runner import ModelRunner

    if not packing_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("oneDNN's bf16 kernels need AVX-512 on this CPU")
    runner = ModelRunner(models.load_model("tiny-llama", dtype="bfloat16"), num_blocks=16)
    mods = list(runner.model.modules())
    assert sum(isinstance(m, KernelRMSNorm) for m in mods) == 2 * runner.model.config.num_hidden_layers + 1
    assert all(m.silu_and_mul is not None for m in mods if isinstance(m, FusedGateUpMLP))
    fp32 = ModelRunner(models.load_model("tiny-llama"), num_blocks=16)
    assert fp32.kernels is kernel and not any(isinstance(m, KernelRMSNorm) for m in fp32.model.modules())


def _greedy_steps(runner, prompts: dict[str, list[int]], steps: int) -> dict[str, list[int]]:
    """Prefill every prompt (blocks laid out by hand, some shared), then ``steps`` batched decode steps."""
    new, computed, out = [], {}, {}
    base = 0
    for rid, p in prompts.items():
        blocks = list(range(base, base + (len(p) + steps) // 16 + 1))
        base += len(blocks)
        new.append(NewRequestSlice(req_id=rid, token_ids=tuple(p), num_tokens=len(p), block_ids=tuple(blocks),
                                   num_computed_tokens=0, num_new_tokens=len(p), sample=True))
        computed[rid] = len(p)
    res = runner.execute(BatchPlan(step_id=0, new=tuple(new)))
    out = {r: [t] for r, t in zip(res.req_ids, res.token_ids)}
    for s in range(1, steps):
        res = runner.execute(BatchPlan(step_id=s, cached=tuple(
            CachedRequestSlice(req_id=r, num_computed_tokens=n + s - 1, num_new_tokens=1, is_decode=True, sample=True)
            for r, n in computed.items())))
        for r, t in zip(res.req_ids, res.token_ids):
            out[r].append(t)
    return out


def test_runner_decodes_the_same_tokens_with_and_without_the_kernel(kernel, make_runner):
    prompts = {f"r{n}": random_prompt(n, n) for n in (5, 17, 40, 63)}
    on = make_runner(num_blocks=64, cpu_kernels=True)
    off = make_runner(num_blocks=64, cpu_kernels=False)
    assert on.kernels is kernel and off.kernels is None
    assert _greedy_steps(on, prompts, 8) == _greedy_steps(off, prompts, 8)


def test_runner_without_a_compiler_keeps_torchs_ops(fresh_loader, monkeypatch, make_runner):
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    assert make_runner(num_blocks=16).kernels is None
    assert "no C++ compiler" in cpu_kernels.unavailable_reason()
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        make_runner(num_blocks=16, cpu_kernels=True)


def test_a_failed_build_is_reported_and_leaves_nothing_behind(fresh_loader, monkeypatch):
    if cpu_kernels._compiler() is None:
        pytest.skip("no C++ compiler here")
    bad = fresh_loader / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", (bad,))
    assert cpu_kernels.load() is None
    assert "broken.cpp failed" in cpu_kernels.unavailable_reason()
    assert list((fresh_loader / "kernels").iterdir()) == []  # no half-written library


def test_runner_refuses_the_kernel_where_it_does_not_apply():
    from executor_svc import models
    from executor_svc.runner import ModelRunner

    half = models.load_model("tiny-mistral", dtype="float16")
    with pytest.raises(ValueError, match="cpu_kernels"):
        ModelRunner(half, num_blocks=16, cpu_kernels=True)
    assert ModelRunner(half, num_blocks=16).kernels is None


def _kernel_sampler(kernel, seed=0):
    from executor_svc.sampler import Sampler

    return Sampler(seed=seed, kernels=kernel)


@pytest.mark.parametrize("temperature,want", [(1.0, (0.7, 0.2, 0.1)), (0.5, (0.49 / 0.54, 0.04 / 0.54, 0.01 / 0.54))])
def test_kernel_sampling_draws_in_proportion(kernel, temperature, want):
    from contract.sampling import SamplingParams

    n = 4000
    row = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    toks = _kernel_sampler(kernel).sample(row.expand(n, 3), [SamplingParams(temperature=temperature, seed=5)] * n,
                                          list(range(n)))
    freq = [toks.count(t) / n for t in range(3)]
    assert all(abs(f - w) < 0.03 for f, w in zip(freq, want)), freq


def test_kernel_sampling_never_draws_a_masked_token(kernel):
    from contract.sampling import SamplingParams

    g = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 5000, generator=g)  # 5,000: the last 64-column chunk is partial
    masked = torch.randperm(5000, generator=g)[:2500]
    logits[:, masked] = float("-inf")
    toks = _kernel_sampler(kernel).sample(logits, [SamplingParams(temperature=2.0)] * 64, [0] * 64)
    assert not set(toks) & set(masked.tolist())
    # a row with one finite logit always draws it
    one = torch.full((3, 5000), float("-inf"))
    one[:, 4999] = 0.0
    assert _kernel_sampler(kernel).sample(one, [SamplingParams(temperature=1.0)] * 3, [0, 1, 2]) == [4999] * 3


def test_kernel_sampling_picks_what_the_torch_path_picks(kernel):
    """The same uniforms over the same weights: the same columns, but where rounding moves a boundary."""
    from contract.sampling import SamplingParams
    from executor_svc.sampler import Sampler

    g = torch.Generator().manual_seed(7)
    logits = 3 * torch.randn(300, 2000, generator=g)
    params = [SamplingParams(temperature=0.8, seed=s) for s in range(300)]
    with_kernel = _kernel_sampler(kernel).sample(logits, params, [9] * 300)
    torch_path = Sampler(seed=0).sample(logits, params, [9] * 300)
    assert sum(a == b for a, b in zip(with_kernel, torch_path)) >= 297
    # each seeded row alone draws what it drew in the batch
    alone = [_kernel_sampler(kernel, seed=1).sample(logits[i : i + 1], params[i : i + 1], [9])[0] for i in range(20)]
    assert alone == with_kernel[:20]


def _bf16_runner_or_skip(kernel, seed=2):
    from executor_svc import models
    from executor_svc.packed_linears import packing_supported
    from executor_svc.runner import ModelRunner

    if not packing_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("oneDNN's bf16 kernels need AVX-512 on this CPU")
    return ModelRunner(models.load_model("tiny-llama", dtype="bfloat16", seed=seed), num_blocks=32)


def _logits_of_steps(runner, prompts, steps):
    seen = []
    real = runner.sampler.sample
    runner.sampler.sample = lambda logits, *a: seen.append(logits.clone()) or real(logits, *a)
    _greedy_steps(runner, prompts, steps)
    return seen


def test_fast_decoder_layers_compute_what_transformers_layers_do(kernel):
    """The layers' step forward (norms, rotary embedding, residual adds as kernels) against the same runner
    with transformers' layer forward: the same logits up to bf16 rounding, step after step."""
    prompts = {f"r{n}": random_prompt(n, n) for n in (7, 30)}
    fast = _bf16_runner_or_skip(kernel)
    assert all(hasattr(layer, "_slai_fast") for layer in fast.model.model.layers)
    plain = _bf16_runner_or_skip(kernel)
    for layer in plain.model.model.layers:
        del layer.forward  # back to the class's forward
    for a, b in zip(_logits_of_steps(fast, prompts, 5), _logits_of_steps(plain, prompts, 5), strict=True):
        torch.testing.assert_close(a, b, atol=0.02, rtol=0.02)


def test_layers_whose_rotary_embedding_differs_keep_their_forward(kernel, monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", lambda q, k, cos, sin: (q * cos, k * cos))
    runner = _bf16_runner_or_skip(kernel)
    assert not any(hasattr(layer, "_slai_fast") for layer in runner.model.model.layers)

"""Prepacked oneDNN linears (CPU: bf16, and fp32 where measured faster): same products as torch's, fused q/k/v and gate/up, runner wiring.

bf16 kernels round differently across CPUs and blockings, so products are compared with
a tolerance and greedy tokens only where the logit margin is large.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM

from executor_svc import models, packed_linears
from executor_svc.packed_linears import (
    FusedGateUpMLP,
    FusedSlice,
    PackedLinear,
    pack_linears,
    packing_supported,
)
from executor_svc.runner import ModelRunner
from tests.executor_svc.helpers import Driver, random_prompt

pytestmark = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.bfloat16),
                                reason="oneDNN's bf16 kernels need AVX-512 on this CPU")


def _reference(x, w, b):
    y = x.float() @ w.float().T
    return y if b is None else y + b.float()


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_computes_the_same_product(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(192, 96, generator=g).to(torch.bfloat16)
    b = torch.randn(192, generator=g).to(torch.bfloat16) if bias else None
    # a strided view as input: the runner's rows are often slices of a bigger tensor
    x = torch.randn(1, rows + 3, 96, generator=g).to(torch.bfloat16)[:, 3:]
    y = PackedLinear(w, b)(x)
    assert y.shape == (1, rows, 192) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _reference(x, w, b), atol=0.25, rtol=0.02)


def _tiny_pair(hidden_act: str | None = None):
    def build():
        if hidden_act is None:
            return models.load_model("tiny-llama", dtype="bfloat16", seed=3).model
        config = models.preset_config("tiny-llama")
        config.hidden_act = hidden_act
        torch.manual_seed(3)
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()

    return build(), build()


@pytest.mark.parametrize("hidden_act", [None, "gelu_pytorch_tanh"])
def test_pack_linears_replaces_every_projection_and_keeps_the_logits(hidden_act):
    plain, packed = _tiny_pair(hidden_act)
    layers = plain.config.num_hidden_layers
    assert pack_linears(packed) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer; the LM head
    attn, mlp = packed.model.layers[0].self_attn, packed.model.layers[0].mlp
    assert isinstance(attn.q_proj, FusedSlice) and isinstance(attn.o_proj, PackedLinear)
    assert type(mlp) is FusedGateUpMLP and isinstance(packed.lm_head, PackedLinear)
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())

    ids = torch.tensor([random_prompt(5, 48)])
    with torch.inference_mode():
        a = plain(input_ids=ids).logits[0].float()
        b = packed(input_ids=ids).logits[0].float()
    atol = 0.02 * a.abs().max().item()
    assert (a - b).abs().max().item() < atol
    # greedy choices agree wherever the reference's best logit leads the runner-up by more than 2 atol
    top2 = a.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * atol
    assert clear.sum() >= 8
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


def test_fused_slices_recompute_for_a_different_input():
    _, packed = _tiny_pair()
    plain = models.load_model("tiny-llama", dtype="bfloat16", seed=3).model.model.layers[0].self_attn
    attn = packed.model.layers[0].self_attn
    pack_linears(packed)
    x = torch.randn(1, 4, plain.q_proj.in_features).to(torch.bfloat16)
    other = torch.randn(1, 4, plain.q_proj.in_features).to(torch.bfloat16)
    with torch.inference_mode():
        attn.q_proj(x)
        k = attn.k_proj(other)  # not the input q_proj saw: its own product, not q's cached columns
        v = attn.v_proj(other)
        torch.testing.assert_close(k.float(), _reference(other, plain.k_proj.weight, None), atol=0.1, rtol=0.02)
        torch.testing.assert_close(v.float(), _reference(other, plain.v_proj.weight, None), atol=0.1, rtol=0.02)
    assert attn.q_proj.shared.x is None and attn.q_proj.shared.y is None  # the last slice let go of them


def test_runner_packs_bf16_by_default_and_refuses_where_it_cannot():
    on = ModelRunner(models.load_model("tiny-llama", dtype="bfloat16"), num_blocks=16)
    assert on.packed_linears and isinstance(on.model.lm_head, PackedLinear)
    off = ModelRunner(models.load_model("tiny-llama", dtype="bfloat16"), num_blocks=16, packed_linears=False)
    assert not off.packed_linears and type(off.model.lm_head) is torch.nn.Linear
    with pytest.raises(ValueError, match="packed_linears"):
        ModelRunner(models.load_model("tiny-llama", dtype="float16"), num_blocks=16, packed_linears=True)


@pytest.mark.parametrize("faster", [False, True])
def test_fp32_packs_by_default_only_where_the_probe_measures_it_faster(monkeypatch, faster):
    probed = []

    def probe(weight):
        probed.append(tuple(weight.shape))
        return faster

    monkeypatch.setattr(packed_linears, "fp32_packing_pays", probe)
    model = models.load_model("tiny-llama")
    head_shape = tuple(model.model.lm_head.weight.shape)
    runner = ModelRunner(model, num_blocks=16)
    assert probed == [head_shape]  # the LM head, probed once
    assert runner.packed_linears is faster
    assert isinstance(runner.model.lm_head, PackedLinear) is faster


def test_fp32_probe_compares_both_products_at_each_row_count(caplog):
    w = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("INFO", logger="executor_svc.packed_linears"):
        verdict = packed_linears.fp32_packing_pays(w, rows=(1, 4), repeats=1)
    assert isinstance(verdict, bool)
    assert "1 rows" in caplog.text and "4 rows" in caplog.text


# bf16 rounding differs between packed and plain products (and across CPUs): a pick counts as
# right when its logit under the plain model is within this of the best (tiny-llama's logits span about +-3.5)
TINY_BF16_LOGIT_GAP = 0.1


@pytest.mark.parametrize("dtype,max_gap", [("bfloat16", TINY_BF16_LOGIT_GAP), ("float32", 1e-4)])
def test_packed_runner_picks_what_the_unpacked_model_would(dtype, max_gap):
    """Chunked prefill mixed with decodes, shuffled blocks: every greedy token of the packed runner is the
    plain model's best, up to rounding (teacher-forced on the runner's own tokens)."""
    prompts = {f"r{n}": random_prompt(n, n) for n in (9, 23, 40)}
    runner = ModelRunner(models.load_model("tiny-llama", dtype=dtype, seed=1), num_blocks=32, packed_linears=True)
    assert runner.packed_linears
    d = Driver(runner, num_blocks=32, shuffle_blocks=7)
    for rid, p in prompts.items():
        d.add(rid, p, 6)
    done = d.run(chunk=16)
    assert set(done) == set(prompts)
    plain = models.load_model("tiny-llama", dtype=dtype, seed=1).model
    for rid, p in prompts.items():
        toks = done[rid]
        assert len(toks) == 6
        with torch.inference_mode():
            logits = plain(input_ids=torch.tensor([p + toks])).logits[0, len(p) - 1 : len(p) - 1 + len(toks)].float()
        gap = logits.max(dim=-1).values - logits.gather(1, torch.tensor(toks)[:, None])[:, 0]
        assert gap.max().item() <= max_gap, (rid, toks, gap.tolist())

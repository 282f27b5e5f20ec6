"""Logprobs and logit processors in the runner (issue 15).

* logprobs of prompt tokens (echo) and of generated tokens, greedy and sampled at temperature 0.7,
  equal those of a plain transformers forward over the same tokens, in fp32 (tiny-mistral here; SmolLM2's
  real weights end to end in tests/gateway/test_openai_logprobs_e2e.py);
* prompt logprobs are sent once: with the first sampled token, also across recompute preemptions;
* logit_bias, min_tokens and the penalties change outputs as vLLM documents (each test fails when the
  option is ignored); requests without options report no logprobs at all.
"""

from __future__ import annotations

import pytest
import torch

from contract.sampling import SamplingParams
from executor_svc.penalties import apply_processors
from tests.executor_svc.helpers import Driver, sdpa_attention

TOL = 2e-3  # fp32: paged chunked attention vs one dense forward


def _reference(model, tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax of a plain (non-paged) transformers forward: ``[len(tokens), vocab]``."""
    with torch.no_grad(), sdpa_attention(model):
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def test_logprobs_equal_transformers_for_prompt_and_generated_tokens(tiny):
    from executor_svc.runner import ModelRunner

    prompt = list(range(1000, 1045))  # 45 tokens: three prefill chunks of 16
    cases = {"greedy": SamplingParams(logprobs=5, prompt_logprobs=3),
             "hot": SamplingParams(temperature=0.7, seed=11, logprobs=5, prompt_logprobs=3)}
    drv = Driver(ModelRunner(tiny, num_blocks=64), num_blocks=64)
    for rid, sp in cases.items():
        drv.add(rid, prompt, 6, sp)
    drv.add("plain", prompt, 6)  # batched alongside; asks for nothing, gets nothing
    done = drv.run(chunk=16)
    assert "plain" not in drv.logprobs
    for rid, sp in cases.items():
        got = drv.logprobs[rid]
        assert len(got) == 6 and got[0].prompt is not None and all(g.prompt is None for g in got[1:])
        full = prompt + done[rid]
        raw = _reference(tiny.model, full)
        # prompt tokens 1..P-1: the model's own distribution (temperature 1)
        assert [e.token_id for e in got[0].prompt] == prompt[1:]
        for p, e in enumerate(got[0].prompt):
            assert e.logprob == pytest.approx(raw[p, prompt[p + 1]].item(), abs=TOL)
            ref_top = torch.topk(raw[p], 3)
            assert list(e.top_logprobs) == pytest.approx(ref_top.values.tolist(), abs=TOL)
        # generated tokens: the distribution sampled from (after temperature; greedy: temperature 1)
        ref = _reference(tiny.model, full, sp.temperature or 1.0)
        for i, (tok, g) in enumerate(zip(done[rid], got)):
            row = ref[len(prompt) - 1 + i]
            assert g.token.token_id == tok
            assert g.token.logprob == pytest.approx(row[tok].item(), abs=TOL)
            assert list(g.token.top_logprobs) == pytest.approx(torch.topk(row, 5).values.tolist(), abs=TOL)
            if rid == "greedy":
                assert g.token.top_ids[0] == tok


def test_prompt_logprobs_are_sent_once_across_recompute_preemptions(make_runner):
    sp = SamplingParams(logprobs=0, prompt_logprobs=0)
    drv = Driver(make_runner(), num_blocks=64)
    drv.add("mid", list(range(10, 50)), 4, sp)  # preempted mid-prefill: nothing sent yet
    drv.add("after", list(range(20, 45)), 4, sp)  # preempted after its first token
    drv.step(chunk=16, only={"mid"})
    drv.preempt("mid")
    drv.step(chunk=32)  # "after" samples its first token; "mid" restarts from scratch
    drv.step(chunk=32)
    drv.preempt("after")
    drv.run(chunk=16)
    for rid, n_prompt in (("mid", 40), ("after", 25)):
        with_prompt = [g for g in drv.logprobs[rid] if g.prompt is not None]
        assert len(with_prompt) == 1 and len(with_prompt[0].prompt) == n_prompt - 1, rid
        assert drv.logprobs[rid][0].prompt is not None  # on the first token
        assert len(drv.logprobs[rid]) == 4 and all(g.token is not None for g in drv.logprobs[rid])


def _greedy(make_runner, prompt, max_new, sp) -> list[int]:
    drv = Driver(make_runner(), num_blocks=64)
    drv.add("r", prompt, max_new, sp)
    return drv.run(chunk=16)["r"]


def test_logit_bias_and_min_tokens_change_greedy_output(make_runner):
    prompt = list(range(30, 47))
    base = _greedy(make_runner, prompt, 5, SamplingParams())
    forced = _greedy(make_runner, prompt, 5, SamplingParams(logit_bias=((777, 100.0),)))
    assert forced == [777] * 5 and base != forced
    banned = _greedy(make_runner, prompt, 5, SamplingParams(logit_bias=((base[0], -100.0),)))
    assert banned[0] != base[0]
    # a stop token pushed to the top cannot be sampled before min_tokens outputs, then it is
    # (the Driver does not finish on stop tokens: the scheduler would)
    stop = SamplingParams(logit_bias=((5, 100.0),), stop_token_ids=(5,), min_tokens=3)
    out = _greedy(make_runner, prompt, 5, stop)
    assert 5 not in out[:3] and out[3:] == [5, 5], out
    # ignore_eos: stop tokens stop nothing, so min_tokens masks nothing
    assert _greedy(make_runner, prompt, 2, SamplingParams(logit_bias=((5, 100.0),), stop_token_ids=(5,),
                                                          min_tokens=3, ignore_eos=True)) == [5, 5]


def test_penalties_follow_vllm_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    prompt, outputs = [0, 1], [3, 3, 4]
    sp = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_processors(logits, [0], [sp], [prompt + outputs], [len(prompt)])[0]
    # repetition over prompt + output (0, 1, 3, 4): positive / 2, negative * 2; then output counts 3: 2, 4: 1
    want = torch.tensor([1.0, -2.0, 0.5, 1.5 - 0.5 * 2 - 0.25, -4.0 - 0.5 - 0.25, 1.0])
    assert torch.allclose(got, want)
    assert torch.equal(apply_processors(logits, [], [], [], [])[0], logits[0])  # no rows: unchanged


def test_presence_and_frequency_penalties_break_greedy_repetition(make_runner):
    prompt = list(range(60, 70))
    base = _greedy(make_runner, prompt, 12, SamplingParams())
    pen = _greedy(make_runner, prompt, 12, SamplingParams(presence_penalty=2.0, frequency_penalty=2.0,
                                                          repetition_penalty=2.0))
    assert len(set(base)) < len(base), base  # the random-weight model repeats itself greedily...
    assert len(set(pen)) > len(set(base)), (base, pen)  # ...and penalised, much less

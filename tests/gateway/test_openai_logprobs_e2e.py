"""Issue 15 end to end, in process: gateway (HTTP + gRPC) -> scheduler -> executor with SmolLM2 in fp32.

* loglikelihood the way evaluation harnesses ask for it (``/v1/completions`` with ``echo``,
  ``max_tokens: 0``, ``logprobs: 1``) equals transformers' numbers for a few (context, continuation)
  pairs; the same prompt logprobs over gRPC (``score_only``);
* chat ``logprobs`` / ``top_logprobs`` of generated tokens equal transformers', streamed and not, and parse
  with the official ``openai`` client;
* ``n`` returns n distinct seeded completions that repeat with the seed; usage counts all of them; an n
  beyond admission is a 400 naming ``n``; penalties and ``logit_bias`` change the text.
"""

from __future__ import annotations

import grpc
import pytest
import pytest_asyncio

from contract.model_files import default_model_dir
from tests.gateway.conftest import start_stack as start_gateway
from tests.scheduler_svc.helpers import start_stack as start_scheduler
from wire.pb.slai.v1 import gateway_pb2, gateway_pb2_grpc

torch = pytest.importorskip("torch")
# NOTE: one stack for the module (model load and executor warm-up dominate the time)
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MODEL_DIR = default_model_dir()
HAVE_MODEL = (MODEL_DIR / "tokenizer.json").is_file() and (MODEL_DIR / "model.safetensors").is_file()
MODEL = MODEL_DIR.name
TOL = 2e-3
PAIRS = [("The capital of France is", " Paris"), ("2 + 2 =", " 4"),
         ("The quick brown fox", " jumps over the lazy dog.")]


@pytest.fixture(scope="module")
def smol():
    if not HAVE_MODEL:
        pytest.skip("SmolLM2 not converted (python -m executor_svc.models)")
    from executor_svc import models

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/executor_svc/conftest.py
    yield models.load_model("default")
    torch.set_num_threads(previous)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def full(smol):
    from executor_svc.runner import ModelRunner

    # a small token budget: a quick warm-up step, and prompts prefilled in chunks
    sched = await start_scheduler([ModelRunner(smol, num_blocks=256)], overrides=("token_budget=32",))
    gw, _ = await start_gateway(MODEL_DIR, scheduler_address=f"127.0.0.1:{sched.scheduler.port}",
                                max_concurrent_requests=8)
    yield gw, smol
    await gw.running.stop(0.5)
    await sched.close()


def _logsoftmax(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _client(gw):
    import openai

    return openai.AsyncOpenAI(base_url=gw.http_base + "/v1", api_key="unused", max_retries=0, timeout=120)


async def test_loglikelihood_and_generated_logprobs_equal_transformers(full):
    gw, smol = full
    oai = _client(gw)
    for context, continuation in PAIRS:
        resp = await oai.completions.create(model=MODEL, prompt=context + continuation, echo=True, max_tokens=0,
                                            logprobs=1, temperature=0)
        choice = resp.choices[0]
        assert choice.text == context + continuation and resp.usage.completion_tokens == 0
        lp = choice.logprobs
        ids = gw.tokenizer.encode(context + continuation)
        ref = _logsoftmax(smol, ids)
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.tokens == [gw.tokenizer.token_text(t) for t in ids]
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
        # the harness' sum: the continuation's tokens are those that start at or after the context's end
        cont = [i for i, off in enumerate(lp.text_offset) if off >= len(context)]
        got = sum(lp.token_logprobs[i] for i in cont)
        want = sum(ref[i - 1, ids[i]].item() for i in cont)
        assert got == pytest.approx(want, abs=TOL * len(cont)), (context, continuation)
        for i in range(1, len(ids)):
            assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=TOL)
            best = ref[i - 1].argmax().item()
            assert lp.top_logprobs[i][gw.tokenizer.token_text(best)] == pytest.approx(ref[i - 1, best].item(),
                                                                                       abs=TOL)

    # the same over gRPC: score_only with prompt_logprobs
    context, continuation = PAIRS[0]
    async with grpc.aio.insecure_channel(gw.grpc_address) as ch:
        msg = gateway_pb2.GenerateRequest(prompt=context + continuation, score_only=True)
        msg.sampling.prompt_logprobs = 2
        chunks = [c async for c in gateway_pb2_grpc.GatewayServiceStub(ch).Generate(msg)]
    ids = gw.tokenizer.encode(context + continuation)
    ref = _logsoftmax(smol, ids)
    prompt_lps = [t for c in chunks for t in c.prompt_logprobs]
    assert [t.token_id for t in prompt_lps] == ids[1:] and not any(c.token_ids for c in chunks)
    assert [t.logprob for t in prompt_lps] == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                            abs=TOL)
    assert all(len(t.top_token_ids) == 2 for t in prompt_lps)

    # generated tokens (chat): greedy, then sampled at temperature 0.7, streamed and not
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt_ids = gw.tokenizer.encode_chat(messages)
    for temperature, seed in ((0.0, None), (0.7, 3)):
        resp = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, logprobs=True,
                                                 top_logprobs=3, temperature=temperature, seed=seed)
        content = resp.choices[0].logprobs.content
        gen = [t for t in resp.choices[0].token_ids] if hasattr(resp.choices[0], "token_ids") else None
        assert gen is None or len(gen) == len(content)
        assert "".join(c.token for c in content) == resp.choices[0].message.content
        ids = prompt_ids + gw.tokenizer.encode(resp.choices[0].message.content, add_special_tokens=False)
        ref = torch.log_softmax(torch.log(torch.exp(_logsoftmax(smol, ids))) / (temperature or 1.0), dim=-1)
        for i, c in enumerate(content):
            row = ref[len(prompt_ids) - 1 + i]
            tok = ids[len(prompt_ids) + i]
            assert c.logprob == pytest.approx(row[tok].item(), abs=TOL)
            assert [t.logprob for t in c.top_logprobs] == pytest.approx(torch.topk(row, 3).values.tolist(), abs=TOL)
            assert bytes(c.bytes) == c.token.encode()
        stream = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, logprobs=True,
                                                   top_logprobs=3, temperature=temperature, seed=seed, stream=True)
        streamed = [t async for ch in stream if ch.choices and ch.choices[0].logprobs
                    for t in ch.choices[0].logprobs.content]
        assert [t.token for t in streamed] == [t.token for t in content]
        assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=TOL)


async def test_n_completions_penalties_and_bias_over_http(full):
    gw, _ = full
    oai = _client(gw)
    prompt = "Once upon a time"
    a = await oai.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=5, temperature=1.0, seed=5)
    b = await oai.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=5, temperature=1.0, seed=5)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.text for c in a.choices]
    assert len(set(texts)) == 3, texts  # each completion its own seed stream (seed + i)...
    assert texts == [c.text for c in b.choices]  # ...so the request repeats
    assert a.usage.completion_tokens == sum(len(gw.tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    assert a.usage.prompt_tokens == len(gw.tokenizer.encode(prompt))
    # streamed: every index finishes; logprobs per completion with text offsets of its own
    stream = await oai.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=4, temperature=1.0, seed=5,
                                          logprobs=2, stream=True, stream_options={"include_usage": True})
    finished, offsets, usage = set(), {0: [], 1: []}, None
    async for ch in stream:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            offsets[c.index] += c.logprobs.text_offset if c.logprobs else []
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and usage.completion_tokens == 8
    assert all(len(o) == 4 and o[0] == 0 for o in offsets.values())

    # n beyond what the gateway admits at once (8) is a 400 naming n, never queued work
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        await oai.completions.create(model=MODEL, prompt=prompt, n=9, max_tokens=2)
    assert err.value.body["param"] == "n"

    # penalties and logit_bias change a greedy completion (fail if ignored)
    loop_prompt = "1, 1, 1, 1, 1, 1, 1, 1,"
    base = (await oai.completions.create(model=MODEL, prompt=loop_prompt, max_tokens=8, temperature=0)).choices[0]
    pen = (await oai.completions.create(model=MODEL, prompt=loop_prompt, max_tokens=8, temperature=0,
                                        presence_penalty=2.0, frequency_penalty=2.0)).choices[0]
    assert base.text != pen.text and base.text.count("1") > pen.text.count("1"), (base.text, pen.text)
    tok = gw.tokenizer.encode(" banana", add_special_tokens=False)[0]
    biased = (await oai.completions.create(model=MODEL, prompt=loop_prompt, max_tokens=3, temperature=0,
                                           logit_bias={str(tok): 100})).choices[0]
    assert biased.text == gw.tokenizer.token_text(tok) * 3
    rep = (await oai.completions.create(model=MODEL, prompt=loop_prompt, max_tokens=8, temperature=0,
                                        extra_body={"repetition_penalty": 1.8})).choices[0]
    assert rep.text != base.text

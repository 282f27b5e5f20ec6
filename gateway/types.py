"""The gateway's wire-neutral values: one request in, a stream of deltas out.

Both front ends (gRPC ``GatewayService`` and the OpenAI-compatible HTTP API)
convert to and from these; ``gateway.codec`` holds their protobuf conversions.
Pure dataclasses: no grpc, no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GenerationInput:
    """One generation request, already parsed but not yet validated."""

    prompt: str | None = None  # raw text (tokenized with the tokenizer's special tokens)
    messages: tuple[tuple[str, str], ...] | None = None  # chat turns (role, content)
    prompt_token_ids: tuple[int, ...] | None = None  # pre-tokenized prompt (HTTP completions only)
    max_tokens: int = 0  # 0 = server default (capped by the model length)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()  # stop strings, cut from the output
    model: str = ""  # must match the served model when set
    request_id: str = ""  # client-chosen id; the gateway picks one when empty
    n: int = 1  # completions of this prompt (sub-requests <request_id>-<i>, docs/gateway.md)
    # logit processors (vLLM's meanings, contract/sampling.py); the defaults mean "off"
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # the client's own, besides the model's EOS ids
    # log probabilities: None = not wanted; k = the token's own plus the top k alternatives
    logprobs: int | None = None  # of each generated token
    prompt_logprobs: int | None = None  # of each prompt token after the first (HTTP: echo with logprobs)
    echo: bool = False  # HTTP completions: the response text starts with the prompt
    score_only: bool = False  # generate nothing, only the prompt's logprobs (echo with max_tokens 0)


@dataclass(frozen=True, slots=True)
class Timings:
    """Request latencies on the scheduler's clock (seconds)."""

    ttft_s: float = 0.0
    e2e_s: float = 0.0
    queue_s: float = 0.0
    max_tbt_s: float = 0.0
    num_preemptions: int = 0


@dataclass(frozen=True, slots=True)
class Delta:
    """New output of one request: text since the previous delta, and its token ids."""

    request_id: str = ""
    text: str = ""  # valid UTF-8: never half a character
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "ignored" | "error" on the last delta
    prompt_tokens: int = 0  # set on the last delta
    completion_tokens: int = 0  # set on the last delta
    timings: Timings | None = None  # set on the last delta
    index: int = 0  # which of the request's n completions
    logprobs: tuple | None = None  # with GenerationInput.logprobs: a contract.logprobs.TokenLogprob per token id
    prompt_logprobs: tuple | None = None  # with prompt_logprobs: prompt tokens 1..P-1, on one delta
    prompt_token_ids: tuple[int, ...] | None = None  # with echo: the prompt, on a completion's first delta

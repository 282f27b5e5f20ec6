"""How an executor samples a request's tokens: the sampling part of the scheduler -> executor contract.

The ranges and meanings follow vLLM's ``SamplingParams`` (docs/gateway.md, "OpenAI parameters"):
penalties, ``logit_bias``, ``min_tokens`` and log probabilities are applied by the executor's
sampler, and only for the requests that set them (:attr:`SamplingParams.has_processors`,
:attr:`SamplingParams.wants_logprobs`), so plain requests take the plain path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_PENALTY = 2.0  # presence / frequency penalty in [-2, 2] (OpenAI, vLLM)
MAX_REPETITION_PENALTY = 100.0  # vLLM requires > 0 only; anything this large already forbids repeats
MAX_LOGIT_BIAS = 100.0  # each bias in [-100, 100] (OpenAI)
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default max_logprobs, OpenAI's top_logprobs limit)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the executor samples this request's tokens. Opaque to every policy."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 = disabled
    seed: int | None = None  # per-request seed: same seed, same tokens
    stop_token_ids: tuple[int, ...] = ()  # the core finishes a request on these...
    ignore_eos: bool = False  # ...unless this is set (trace replay / benchmarks)
    # ---- logit processors (vLLM's meanings); the defaults mean "off"
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 1 discourages tokens of prompt + output (divides positive logits)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # stop_token_ids cannot be sampled before this many outputs (unless ignore_eos)
    # ---- log probabilities (None = not wanted; k = the token's own plus the top k alternatives)
    logprobs: int | None = None  # of every sampled token
    prompt_logprobs: int | None = None  # of every prompt token after the first (the model's own distribution)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -MAX_PENALTY <= v <= MAX_PENALTY):
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
                             f"got {self.repetition_penalty}")
        for tok, bias in self.logit_bias:
            if tok < 0 or not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise ValueError(f"logit_bias must map token ids >= 0 to values in [-100, 100], got {tok}: {bias}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")

    @property
    def has_processors(self) -> bool:
        """Penalties, a bias or min_tokens change this request's logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None or self.prompt_logprobs is not None

"""Checks shared by both front ends: limits, ids, text, sampling ranges (docs/gateway.md "Errors").

:func:`check_input` runs in ``GenerationService.prepare`` on every request, gRPC or HTTP,
before any tokenizing. Every failure is a ``ValueError`` whose message starts with the
field name (-> INVALID_ARGUMENT / 400). A message never repeats more than
:data:`CLIP_CHARS` characters of what the client sent (:func:`clip`), so a huge or
odd field cannot blow up an error reply or break its encoding.
"""

from __future__ import annotations

import math
import re

from contract.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY, MAX_REPETITION_PENALTY
from gateway.types import GenerationInput

CLIP_CHARS = 64  # at most this much of a client's string is repeated in an error message
MAX_MODEL_NAME_LEN = 256
MAX_REQUEST_ID_LEN = 128
# NOTE: the request id goes to the scheduler, logs, spans and every response chunk:
# keep it short and free of spaces, quotes and control characters.
REQUEST_ID_CHARS = "letters, digits and . _ : @ / + = ~ -"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=~-]+")
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 256  # HTTP: text parts in one message's content
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_SEED = 2**64 - 1
MAX_TOP_K = 2**31 - 1  # anything at or above the vocabulary size means "disabled" anyway
MAX_TEMPERATURE = 100.0
MAX_N = 128  # completions per request (OpenAI's limit); admission counts each (gateway/admission.py)
MAX_LOGIT_BIAS_KEYS = 300
MAX_STOP_TOKEN_IDS = 64
ROLES = ("system", "user", "assistant", "tool", "developer")


def clip(value: str, limit: int = CLIP_CHARS) -> str:
    """``repr`` of a client string cut to ``limit`` characters: safe to put in an error message.

    ``repr`` escapes control characters and lone surrogates, so the result always encodes as UTF-8.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_text(field: str, value: str) -> None:
    """Reject strings that are not valid Unicode text (JSON can carry a lone surrogate like ``\\ud800``)."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field}: not valid Unicode text (a lone surrogate at character {exc.start})") from None


def check_request_id(request_id: str) -> None:
    """A client-chosen id: 1..128 characters of a safe set (the caller handles "empty")."""
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise ValueError(f"request_id: at most {MAX_REQUEST_ID_LEN} characters, got {len(request_id)}")
    if not _REQUEST_ID_RE.fullmatch(request_id):
        raise ValueError(f"request_id: only {REQUEST_ID_CHARS} are allowed, got {clip(request_id)}")


def check_model(model: str, served: str) -> None:
    """``model`` is optional; when set it must name the served model."""
    if not model or model == served:
        return
    if len(model) > MAX_MODEL_NAME_LEN:
        raise ValueError(f"model: at most {MAX_MODEL_NAME_LEN} characters, got {len(model)}; "
                         f"this gateway serves {served!r}")
    raise ValueError(f"model: unknown model {clip(model)}; this gateway serves {served!r}")


def check_sampling(inp: GenerationInput) -> None:
    """Sampling ranges and stop strings."""
    if not math.isfinite(inp.temperature) or inp.temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {inp.temperature}")
    if inp.temperature > MAX_TEMPERATURE:
        raise ValueError(f"temperature: must be <= {MAX_TEMPERATURE:g}, got {inp.temperature}")
    if not math.isfinite(inp.top_p) or not 0 < inp.top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {inp.top_p}")
    if not 0 <= inp.top_k <= MAX_TOP_K:
        raise ValueError(f"top_k: must be in [0, {MAX_TOP_K}] (0 or -1 = disabled), got {inp.top_k}")
    if inp.seed is not None and not 0 <= inp.seed <= MAX_SEED:
        raise ValueError(f"seed: must be in [0, 2^64), got {inp.seed}")
    if not 1 <= inp.n <= MAX_N:
        raise ValueError(f"n: must be in [1, {MAX_N}], got {inp.n}")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(inp, name)
        if not math.isfinite(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
            raise ValueError(f"{name}: must be in [-2, 2], got {v}")
    if not math.isfinite(inp.repetition_penalty) or not 0 < inp.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise ValueError(f"repetition_penalty: must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), "
                         f"got {inp.repetition_penalty}")
    if len(inp.logit_bias) > MAX_LOGIT_BIAS_KEYS:
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS_KEYS} tokens, got {len(inp.logit_bias)}")
    for tok, bias in inp.logit_bias:
        if not math.isfinite(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: each bias must be in [-100, 100], got {bias} for token {tok}")
    if inp.min_tokens < 0:
        raise ValueError(f"min_tokens: must be >= 0, got {inp.min_tokens}")
    if len(inp.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(inp.stop_token_ids)}")
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(inp, name)
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"{name}: must be in [0, {MAX_LOGPROBS}], got {v}")
    if len(inp.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(inp.stop)}")
    for s in inp.stop:
        if not s or len(s) > MAX_STOP_LEN:
            raise ValueError(f"stop: each stop string must have 1..{MAX_STOP_LEN} characters, got {len(s)}")
        check_text("stop", s)


def check_input(inp: GenerationInput, served_model: str, max_model_len: int) -> None:
    """Everything about a request that can be checked before tokenizing it."""
    check_model(inp.model, served_model)
    if inp.request_id:
        check_request_id(inp.request_id)
    check_sampling(inp)
    if inp.messages is not None:
        if not inp.messages:
            raise ValueError("messages: must contain at least one message")
        if len(inp.messages) > MAX_MESSAGES:
            raise ValueError(f"messages: at most {MAX_MESSAGES} messages, got {len(inp.messages)}")
        for i, (role, content) in enumerate(inp.messages):
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role: unknown role {clip(role)}; expected one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content: must be text")
            check_text(f"messages[{i}].content", content)
    elif inp.prompt_token_ids is not None:
        if len(inp.prompt_token_ids) >= max_model_len:  # before looking at each id
            raise ValueError(f"prompt: {len(inp.prompt_token_ids)} tokens; this model allows at most "
                             f"{max_model_len - 1} prompt tokens ({max_model_len} in all)")
    elif inp.prompt:
        check_text("prompt", inp.prompt)

"""Every request parameter the OpenAI-compatible HTTP API knows, and what it does with it.

The one table (:data:`ROWS`, documented in docs/gateway.md "OpenAI parameters") sorts each
parameter of ``/v1/completions`` and ``/v1/chat/completions`` (OpenAI's, plus vLLM's
extras that clients such as ``vllm bench serve`` send) into one of three kinds:

* ``honoured``: parsed by ``gateway.http_api`` and applied;
* ``ignored``: accepted and type-checked, with no effect, because it cannot change the
  output (``user`` is only an end-user identifier for the provider's abuse tracking);
* ``unsupported``: accepted only at a value that means "off" (``null`` always does, plus
  the values in the row, e.g. ``presence_penalty: 0``, ``logprobs: false``); any other
  value is a 400 naming the parameter, never silently dropped.

A key in no row is a 400 too (``foo: unrecognized request parameter``). This follows
OpenAI, which rejects unrecognized arguments, rather than vLLM, which logs and ignores
them: an ignored sampling knob (``min_tokens``, ``repetition_penalty``, ...) silently
changes what the client gets, which is exactly what the table exists to prevent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from gateway.validation import clip

HONOURED, IGNORED, UNSUPPORTED = "honoured", "ignored", "unsupported"
COMPLETIONS, CHAT = "completions", "chat"
ENDPOINT_PATHS = {COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions"}
_BOTH = (COMPLETIONS, CHAT)

MAX_IDENTIFIER_LEN = 256  # user, safety_identifier, prompt_cache_key
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's own limits


class ParamError(ValueError):
    """A request parameter is unknown, of the wrong type, or set to a value we do not support."""


JSON_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
                   dict: "object", type(None): "null"}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (for "expected X, got Y" messages)."""
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _identifier(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ParamError(f"{name}: expected string, got {json_type(value)}")
    if len(value) > MAX_IDENTIFIER_LEN:
        raise ParamError(f"{name}: at most {MAX_IDENTIFIER_LEN} characters, got {len(value)}")


def _metadata(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ParamError(f"{name}: expected an object of string values, got {json_type(value)}")
    if len(value) > MAX_METADATA_PAIRS:
        raise ParamError(f"{name}: at most {MAX_METADATA_PAIRS} keys, got {len(value)}")
    for k, v in value.items():
        if len(k) > MAX_METADATA_KEY or not isinstance(v, str) or len(v) > MAX_METADATA_VALUE:
            raise ParamError(f"{name}: keys of at most {MAX_METADATA_KEY} characters with string values of "
                             f"at most {MAX_METADATA_VALUE}; {clip(k)} is not")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ParamError(f"{name}: expected boolean, got {json_type(value)}")


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    endpoints: tuple[str, ...]
    kind: str
    accepted: tuple = ()  # unsupported: values that mean "off" besides null
    check: Callable[[str, Any], None] | None = None  # type/size check of a non-null value
    note: str = ""


# The table. Order: OpenAI's reference, then vLLM's extras.
ROWS: tuple[Param, ...] = (
    # ---- honoured (parsed in gateway/http_api.py)
    Param("model", _BOTH, HONOURED, note="optional; must name the served model"),
    Param("prompt", (COMPLETIONS,), HONOURED, note="a string, a list of one string, or a list of token ids"),
    Param("messages", (CHAT,), HONOURED, note="text content only (a string or text parts)"),
    Param("max_tokens", _BOTH, HONOURED, note="absent: --default-max-tokens, capped by the model length"),
    Param("max_completion_tokens", (CHAT,), HONOURED, note="same as max_tokens"),
    Param("temperature", _BOTH, HONOURED, note="absent: 1.0; 0 = greedy"),
    Param("top_p", _BOTH, HONOURED),
    Param("n", _BOTH, HONOURED, note="1..128 completions; each holds an admission slot; seeds seed+i"),
    Param("stream", _BOTH, HONOURED),
    Param("stream_options", _BOTH, HONOURED, note="include_usage; only with stream: true"),
    Param("stop", _BOTH, HONOURED, note="up to 16 strings of 1..256 characters"),
    Param("seed", _BOTH, HONOURED, note="0 <= seed < 2^64"),
    Param("top_k", _BOTH, HONOURED, note="vLLM extra; 0 or -1 = disabled"),
    Param("frequency_penalty", _BOTH, HONOURED, note="[-2, 2]; per occurrence in the output"),
    Param("presence_penalty", _BOTH, HONOURED, note="[-2, 2]; once per token in the output"),
    Param("logit_bias", _BOTH, HONOURED, note='{"token id": bias in [-100, 100]}, at most 300 tokens'),
    Param("logprobs", (COMPLETIONS,), HONOURED, note="0..20 top alternatives per token (0: the token's own only)"),
    Param("logprobs", (CHAT,), HONOURED, note="boolean"),
    Param("top_logprobs", (CHAT,), HONOURED, note="0..20; needs logprobs: true"),
    Param("echo", (COMPLETIONS,), HONOURED,
          note="the prompt starts the text (and logprobs); with max_tokens 0 nothing is generated"),
    Param("repetition_penalty", _BOTH, HONOURED, note="vLLM extra; (0, 100], 1 = off; prompt + output tokens"),
    Param("min_tokens", _BOTH, HONOURED, note="vLLM extra; <= max_tokens; stop tokens are masked until then"),
    Param("stop_token_ids", _BOTH, HONOURED,
          note="vLLM extra; up to 64 ids, besides the model's EOS ids (also with ignore_eos)"),
    Param("ignore_eos", _BOTH, HONOURED, note="vLLM extra"),
    Param("request_id", _BOTH, HONOURED, note="vLLM extra; <= 128 characters of letters, digits and ._:@/+=~-"),
    Param("return_token_ids", _BOTH, HONOURED, check=_boolean,
          note="vLLM extra; each choice (and each streamed chunk) also carries its generated token_ids"),
    # ---- ignored: cannot change the output
    Param("user", _BOTH, IGNORED, check=_identifier, note="end-user identifier for the provider's abuse tracking"),
    Param("safety_identifier", _BOTH, IGNORED, check=_identifier, note="the newer name of user"),
    Param("prompt_cache_key", (CHAT,), IGNORED, check=_identifier, note="a cache-routing hint"),
    Param("metadata", (CHAT,), IGNORED, check=_metadata, note="tags for stored completions (store is off)"),
    # ---- unsupported: only their "off" values are accepted
    Param("echo", (CHAT,), UNSUPPORTED, (False,), note="vLLM extra (prepends the last message)"),
    Param("best_of", (COMPLETIONS,), UNSUPPORTED, (1,), note="use n; ranking by logprob is not offered"),
    Param("suffix", (COMPLETIONS,), UNSUPPORTED, ("",)),
    Param("tools", (CHAT,), UNSUPPORTED, ([],)),
    Param("tool_choice", (CHAT,), UNSUPPORTED, ("none", "auto"), note="without tools both mean none"),
    Param("functions", (CHAT,), UNSUPPORTED, ([],)),
    Param("function_call", (CHAT,), UNSUPPORTED, ("none", "auto")),
    Param("parallel_tool_calls", (CHAT,), UNSUPPORTED, (True, False), note="meaningless without tools"),
    Param("response_format", _BOTH, UNSUPPORTED, ({"type": "text"},), note="completions: vLLM extra"),
    Param("modalities", (CHAT,), UNSUPPORTED, (["text"],)),
    Param("audio", (CHAT,), UNSUPPORTED),
    Param("prediction", (CHAT,), UNSUPPORTED),
    Param("reasoning_effort", (CHAT,), UNSUPPORTED),
    Param("verbosity", (CHAT,), UNSUPPORTED, ("medium",)),
    Param("service_tier", (CHAT,), UNSUPPORTED, ("auto", "default"), note="the tier comes from the API key"),
    Param("store", (CHAT,), UNSUPPORTED, (False,)),
    Param("web_search_options", (CHAT,), UNSUPPORTED),
    # vLLM's extra sampling and rendering parameters, at their defaults
    Param("min_p", _BOTH, UNSUPPORTED, (0,)),
    Param("length_penalty", _BOTH, UNSUPPORTED, (1,)),
    Param("use_beam_search", _BOTH, UNSUPPORTED, (False,)),
    Param("include_stop_str_in_output", _BOTH, UNSUPPORTED, (False,)),
    Param("skip_special_tokens", _BOTH, UNSUPPORTED, (True,), note="special tokens are always skipped"),
    Param("spaces_between_special_tokens", _BOTH, UNSUPPORTED, (True,)),
    Param("truncate_prompt_tokens", _BOTH, UNSUPPORTED),
    Param("allowed_token_ids", _BOTH, UNSUPPORTED),
    Param("bad_words", _BOTH, UNSUPPORTED, ([],)),
    Param("prompt_logprobs", _BOTH, UNSUPPORTED),
    Param("add_special_tokens", (COMPLETIONS,), UNSUPPORTED, (True,), note="prompts get the tokenizer's own"),
    Param("add_special_tokens", (CHAT,), UNSUPPORTED, (False,), note="the chat template writes them"),
    Param("add_generation_prompt", (CHAT,), UNSUPPORTED, (True,)),
    Param("continue_final_message", (CHAT,), UNSUPPORTED, (False,)),
    Param("chat_template", (CHAT,), UNSUPPORTED),
    Param("chat_template_kwargs", (CHAT,), UNSUPPORTED, ({},)),
    Param("documents", (CHAT,), UNSUPPORTED),
    Param("structured_outputs", _BOTH, UNSUPPORTED),
    Param("guided_json", _BOTH, UNSUPPORTED),
    Param("guided_regex", _BOTH, UNSUPPORTED),
    Param("guided_choice", _BOTH, UNSUPPORTED),
    Param("guided_grammar", _BOTH, UNSUPPORTED),
    Param("priority", _BOTH, UNSUPPORTED, (0,), note="priority comes from the API key's tier"),
    Param("return_tokens_as_token_ids", _BOTH, UNSUPPORTED, (False,)),
    Param("cache_salt", _BOTH, UNSUPPORTED),
    Param("kv_transfer_params", _BOTH, UNSUPPORTED),
    Param("vllm_xargs", _BOTH, UNSUPPORTED),
)

# Keys of one chat message (besides role and content, which are parsed).
MESSAGE_ROWS: tuple[Param, ...] = (
    Param("name", (CHAT,), UNSUPPORTED, note="the chat template has no participant names"),
    Param("tool_calls", (CHAT,), UNSUPPORTED, ([],)),
    Param("tool_call_id", (CHAT,), UNSUPPORTED),
    Param("function_call", (CHAT,), UNSUPPORTED),
    Param("refusal", (CHAT,), UNSUPPORTED),
    Param("audio", (CHAT,), UNSUPPORTED),
    Param("annotations", (CHAT,), UNSUPPORTED, ([],)),
)

# Keys of stream_options (the object itself is honoured; include_usage is read by gateway/http_api.py).
STREAM_OPTION_ROWS: tuple[Param, ...] = (
    Param("include_usage", _BOTH, HONOURED, check=_boolean, note="a last chunk with usage"),
    Param("include_obfuscation", _BOTH, IGNORED, check=_boolean,
          note="OpenAI's random padding against length side channels; chunks carry none"),
    Param("continuous_usage_stats", _BOTH, UNSUPPORTED, (False,), note="vLLM: usage in every chunk"),
)

TABLE: dict[str, dict[str, Param]] = {ep: {p.name: p for p in ROWS if ep in p.endpoints} for ep in _BOTH}
_MESSAGE_TABLE = {p.name: p for p in MESSAGE_ROWS}
_STREAM_OPTION_TABLE = {p.name: p for p in STREAM_OPTION_ROWS}
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


def field_name(key: str) -> str:
    """A client's key as it may appear at the start of an error message (clipped when odd or long)."""
    return key if _PLAIN_NAME.fullmatch(key) else clip(key)


def _same(value: Any, off: Any) -> bool:
    # NOTE: JSON types must match: false is not 0, and 0.0 is 0.
    if isinstance(off, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(off, bool) and value == off
    if isinstance(off, (int, float)):
        return isinstance(value, (int, float)) and value == off
    return type(value) is type(off) and value == off


def _check_value(p: Param, field: str, value: Any) -> None:
    if value is None:
        return
    if p.check is not None:
        p.check(field, value)
    if p.kind == UNSUPPORTED and not any(_same(value, off) for off in p.accepted):
        allowed = ", ".join(json.dumps(v) for v in (None, *p.accepted))
        raise ParamError(f"{field}: not supported by this server; omit it or send {allowed}")


def check_params(body: dict, endpoint: str) -> None:
    """Reject unknown keys and unsupported parameters set to anything but "off"."""
    table = TABLE[endpoint]
    for key, value in body.items():
        p = table.get(key)
        if p is None:
            name = field_name(key)
            if key in TABLE[CHAT if endpoint == COMPLETIONS else COMPLETIONS]:
                raise ParamError(f"{name}: not a parameter of {ENDPOINT_PATHS[endpoint]}")
            raise ParamError(f"{name}: unrecognized request parameter for {ENDPOINT_PATHS[endpoint]}")
        _check_value(p, key, value)


def check_message_keys(message: dict, index: int) -> None:
    """A chat message's keys besides role and content: known, and "off"."""
    for key, value in message.items():
        if key in ("role", "content"):
            continue
        p = _MESSAGE_TABLE.get(key)
        if p is None:
            raise ParamError(f"messages[{index}]: unrecognized key {clip(key)}")
        _check_value(p, f"messages[{index}].{key}", value)


def check_stream_options(options: dict) -> None:
    """``stream_options``' keys: known, of the right type, and "off" where unsupported."""
    for key, value in options.items():
        p = _STREAM_OPTION_TABLE.get(key)
        if p is None:
            raise ParamError(f"stream_options: unrecognized option {clip(key)}")
        _check_value(p, f"stream_options.{key}", value)

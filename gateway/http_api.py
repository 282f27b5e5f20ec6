"""OpenAI-compatible HTTP API (FastAPI), served on the gateway's event loop.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``
as server-sent events ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health`` (200, or 503 with a ``reason`` while the scheduler is down or the
gateway drains). The official ``openai`` client works against it unchanged.

Bodies are parsed by hand (not by pydantic models) so every error is a 400 in
OpenAI's error shape whose ``param`` names the offending field. Status codes:
400 bad input, 401 unknown key, 429 full (with ``Retry-After``), 503 scheduler
down. A streamed response starts once the first token is known, so admission
and scheduler errors still get their own status code.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.auth import KeyStore, Unauthenticated
from gateway.config import TierPolicy
from gateway.http_guard import retry_after_value
from gateway.logprobs import (
    CompletionLogprobs,
    chat_logprobs,
    merge_completion_logprobs,
)
from gateway.openai_params import (
    CHAT,
    COMPLETIONS,
    JSON_TYPE_NAMES,
    check_message_keys,
    check_params,
    check_stream_options,
    json_type,
)
from gateway.service import GenerationService
from gateway.types import Delta, GenerationInput
from gateway.validation import (
    MAX_CONTENT_PARTS,
    MAX_LOGIT_BIAS_KEYS,
    MAX_MESSAGES,
    MAX_N,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    clip,
)
from telemetry.metrics_http import add_metrics_route
from wire.grpc_server import AdmissionRejected, DeadlineExceeded

FINISH_TO_OPENAI = {"stop": "stop", "length": "length", "ignored": "length", "abort": "abort", "error": "error"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class BadRequest(ValueError):
    """Malformed body (the message starts with the field name)."""


MAX_ERROR_MESSAGE_CHARS = 1024  # backstop; messages clip client input themselves (gateway.validation.clip)


def _safe_message(message: str) -> str:
    """Bounded, and always encodable (a lone surrogate would make the JSON reply itself fail)."""
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS] + "..."
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(exc: BaseException) -> JSONResponse:
    """Map a gateway exception to OpenAI's error body and an HTTP status."""
    headers: dict[str, str] = {}
    message = _safe_message(str(exc))
    param = None
    if isinstance(exc, Unauthenticated):
        status, kind = 401, "authentication_error"
    elif isinstance(exc, AdmissionRejected):
        status, kind = 429, "rate_limit_error"
        headers["Retry-After"] = retry_after_value(exc)
    elif isinstance(exc, ValueError):
        status, kind = 400, "invalid_request_error"
        head, sep, _ = message.partition(":")
        if sep and " " not in head.strip():
            param = head.strip()
    elif isinstance(exc, DeadlineExceeded):
        status, kind = 504, "timeout"
    elif isinstance(exc, (ConnectionError, TimeoutError)):
        status, kind = 503, "service_unavailable"
    elif isinstance(exc, LookupError):
        status, kind = 404, "not_found_error"
    else:
        status, kind = 500, "internal_error"
        message = _safe_message(f"internal error: {type(exc).__name__}: {exc}")
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------- body parsing
# Parameters are checked against gateway/openai_params.py's table first (unknown and
# unsupported ones are a 400 naming them), then the honoured ones are parsed here with
# strict JSON types: true is not 1, 1.5 is not an integer, "1" is not a number.
def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object; anything else is a 400 naming ``body``."""
    try:
        body = json.loads(raw or b"")
    except RecursionError:
        raise BadRequest("body: malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise BadRequest(f"body: malformed JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body: expected a JSON object, got {json_type(body)}")
    return body


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, allow_none: bool = True) -> Any:
    value = body.get(name, default)
    if value is None and allow_none:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(dict.fromkeys(JSON_TYPE_NAMES[k] for k in kinds))
        raise BadRequest(f"{name}: expected {expected}, got {json_type(value)}")
    return value


def _get_int(body: dict, name: str, default: int | None = None) -> int | None:
    value = _get(body, name, (int,), default)
    # NOTE: no field takes more than 64 bits; bounding here also keeps the number out of error messages.
    if value is not None and not -(2**64) < value < 2**64:
        raise BadRequest(f"{name}: integer out of range (more than 64 bits)")
    return value


def _get_float(body: dict, name: str, default: float) -> float:
    value = _get(body, name, (int, float), default)
    try:
        return float(value)
    except OverflowError:  # an integer literal beyond 1.8e308
        raise BadRequest(f"{name}: must be a finite number, got an integer too large for a float") from None


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` (JSON object keys are strings) as sorted pairs; ranges are checked later."""
    value = _get(body, "logit_bias", (dict,))
    if not value:
        return ()
    if len(value) > MAX_LOGIT_BIAS_KEYS:
        raise BadRequest(f"logit_bias: at most {MAX_LOGIT_BIAS_KEYS} tokens, got {len(value)}")
    out = []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise BadRequest(f"logit_bias: keys must be token ids (decimal integers), got {clip(key)}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise BadRequest(f"logit_bias: values must be numbers, got {json_type(bias)} for {key}")
        try:
            out.append((int(key), float(bias)))
        except OverflowError:
            raise BadRequest(f"logit_bias: each bias must be in [-100, 100], got an integer too large "
                             f"for {key}") from None
    return tuple(sorted(out))


def _token_id_list(body: dict, name: str) -> tuple[int, ...]:
    value = _get(body, name, (list,))
    if not value:
        return ()
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise BadRequest(f"{name}: at most {MAX_STOP_TOKEN_IDS} ids, got {len(value)}")
    if not _is_token_ids(value):
        raise BadRequest(f"{name}: expected a list of token ids (integers)")
    return tuple(value)


def _common_fields(body: dict, max_tokens_names: tuple[str, ...], min_max_tokens: int = 1) -> dict[str, Any]:
    max_tokens = 0
    for name in max_tokens_names:
        value = _get_int(body, name)
        if value is not None:
            if value < min_max_tokens:
                raise BadRequest(f"{name}: must be >= 1, got {value}")
            max_tokens = value
    n = _get_int(body, "n", 1)
    if not 1 <= n <= MAX_N:  # here too: the response is sized by n before the service checks it
        raise BadRequest(f"n: must be in [1, {MAX_N}], got {n}")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest("stop: expected a string or a list of strings")
    seed = _get_int(body, "seed")
    top_k = _get_int(body, "top_k", 0)
    return dict(
        max_tokens=max_tokens,
        temperature=_get_float(body, "temperature", 1.0),
        top_p=_get_float(body, "top_p", 1.0),
        top_k=0 if top_k == -1 else top_k,  # vLLM spells "disabled" as -1
        seed=seed,
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
        stop=stops,
        model=_get(body, "model", (str,), ""),
        request_id=_get(body, "request_id", (str,), ""),
        n=n,
        presence_penalty=_get_float(body, "presence_penalty", 0.0),
        frequency_penalty=_get_float(body, "frequency_penalty", 0.0),
        repetition_penalty=_get_float(body, "repetition_penalty", 1.0),
        logit_bias=_logit_bias(body),
        min_tokens=_get_int(body, "min_tokens", 0),
        stop_token_ids=_token_id_list(body, "stop_token_ids"),
    )


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_completion(body: dict) -> GenerationInput:
    check_params(body, COMPLETIONS)
    echo = _get(body, "echo", (bool,), False)
    # NOTE: echo with max_tokens 0 scores the prompt and generates nothing (loglikelihood evaluation)
    fields = _common_fields(body, ("max_tokens",), min_max_tokens=0 if echo else 1)
    # NOTE: false means "off" too (some clients send the chat spelling); true is a 400 (0? 5?)
    logprobs = None if body.get("logprobs") is False else _get_int(body, "logprobs")
    score_only = echo and body.get("max_tokens") == 0
    fields.update(logprobs=logprobs, echo=echo, score_only=score_only,
                  prompt_logprobs=logprobs if echo else None)
    if score_only:
        fields.update(logprobs=None)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if prompt is None or prompt == [] or prompt == "":
        raise BadRequest("prompt: must not be empty")
    if isinstance(prompt, str):
        return GenerationInput(prompt=prompt, **fields)
    if _is_token_ids(prompt):
        return GenerationInput(prompt_token_ids=tuple(prompt), **fields)
    if isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt) or all(map(_is_token_ids, prompt))):
        raise BadRequest(f"prompt: one prompt per request (use n for several completions), got a batch of "
                         f"{len(prompt)}")
    raise BadRequest("prompt: expected a string, a list of one string, or a list of token ids")


def _message_content(i: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"messages[{i}].content: expected a string or a list of text parts, "
                         f"got {json_type(content)}")
    if len(content) > MAX_CONTENT_PARTS:
        raise BadRequest(f"messages[{i}].content: at most {MAX_CONTENT_PARTS} parts, got {len(content)}")
    parts = []
    for j, p in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(p, dict):
            raise BadRequest(f"{where}: expected an object with type and text, got {json_type(p)}")
        kind = p.get("type")
        if kind != "text":
            got = clip(kind) if isinstance(kind, str) else json_type(kind)
            raise BadRequest(f"{where}.type: only text parts are supported, got {got}")
        extra = [k for k in p if k not in ("type", "text")]
        if extra:
            raise BadRequest(f"{where}: unrecognized key {clip(extra[0])} (a text part has type and text)")
        if not isinstance(p.get("text"), str):
            raise BadRequest(f"{where}.text: expected string, got {json_type(p.get('text'))}")
        parts.append(p["text"])
    return "".join(parts)


def parse_chat(body: dict) -> GenerationInput:
    check_params(body, CHAT)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of messages")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"messages: at most {MAX_MESSAGES} messages, got {len(messages)}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}]: expected an object with role and content, got {json_type(m)}")
        check_message_keys(m, i)
        role = m.get("role")
        if not isinstance(role, str):
            raise BadRequest(f"messages[{i}].role: expected string, got {json_type(role)}")
        turns.append((role, _message_content(i, m.get("content"))))
    fields = _common_fields(body, ("max_tokens", "max_completion_tokens"))
    logprobs = _get(body, "logprobs", (bool,), False)
    top = _get_int(body, "top_logprobs")
    if top is not None and not logprobs:
        raise BadRequest("top_logprobs: only allowed with logprobs: true")
    fields.update(logprobs=(top or 0) if logprobs else None)
    return GenerationInput(messages=tuple(turns), **fields)


def parse_stream(body: dict) -> tuple[bool, bool]:
    """``(stream, include_usage)`` from ``stream`` and ``stream_options``."""
    stream = _get(body, "stream", (bool,), False)
    opts = _get(body, "stream_options", (dict,))
    if opts is None:
        return stream, False
    if not stream:  # as OpenAI and vLLM answer
        raise BadRequest("stream_options: only allowed with stream: true")
    check_stream_options(opts)
    return stream, opts.get("include_usage") is True


# ---------------------------------------------------------------- the app
def build_app(service: GenerationService, keys: KeyStore) -> FastAPI:
    app = FastAPI(title="slai-serve gateway", docs_url=None, redoc_url=None)
    created = int(time.time())
    add_metrics_route(app, service.metrics.registry)  # GET /metrics (Prometheus)

    async def read_json(request: Request) -> dict:
        # NOTE: stream(), not body(): body() keeps its copy on the Request while the response
        # streams. Its size is bounded before this (gateway.http_guard.BodyLimit).
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
        return parse_body(bytes(raw))

    @app.get("/health")
    async def health() -> JSONResponse:
        # 503 while the scheduler is down or not serving, or while the gateway drains (gateway.readiness)
        body = {"status": "ok", "model": service.model_name, "scheduler": service.scheduler_state(),
                "in_flight": service.num_in_flight}
        why = service.readiness.why_not()
        if why:
            return JSONResponse({**body, "status": "unavailable", "reason": why}, status_code=503)
        return JSONResponse(body)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            keys.resolve(request.headers.get("authorization"))
        except Unauthenticated as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": created, "owned_by": "slai-serve",
            "max_model_len": service.max_model_len}]})

    async def handle(request: Request, chat: bool) -> Response:
        try:
            tier = keys.resolve(request.headers.get("authorization"))
            body = await read_json(request)
            inp = parse_chat(body) if chat else parse_completion(body)
            stream, include_usage = parse_stream(body)
            with_ids = _get(body, "return_token_ids", (bool,), False)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            return error_response(exc)
        if stream:
            return await _stream(service, inp, tier, chat, include_usage, request.headers, with_ids)
        return await _complete(service, inp, tier, chat, request.headers, with_ids)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    return app


def _usage(d: Delta, completion_tokens: int | None = None) -> dict:
    completion = d.completion_tokens if completion_tokens is None else completion_tokens
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": completion,
            "total_tokens": d.prompt_tokens + completion}


class _Choice:
    """One completion's rendering state: its echo, logprobs and text offsets (streamed or not)."""

    def __init__(self, service: GenerationService, inp: GenerationInput, chat: bool) -> None:
        self.tok = service.tokenizer
        self.inp = inp
        self.chat = chat
        self.completion_lp = CompletionLogprobs(self.tok) if not chat else None

    def echo_text(self, d: Delta) -> str:
        """The prompt as the response text starts with it (``echo``), on its first delta; else ""."""
        if d.prompt_token_ids is None:
            return ""
        return self.inp.prompt if self.inp.prompt is not None else self.tok.decode(list(d.prompt_token_ids))

    def logprobs(self, d: Delta) -> dict | None:
        """This delta's ``logprobs`` value in the endpoint's shape (None when not asked for)."""
        inp = self.inp
        if self.chat:
            if inp.logprobs is None:
                return None
            return {"content": chat_logprobs(self.tok, d.token_ids, d.logprobs or (None,) * len(d.token_ids),
                                             inp.logprobs), "refusal": None}
        if inp.logprobs is None and inp.prompt_logprobs is None:
            return None
        parts = []
        if d.prompt_token_ids is not None:
            entries = d.prompt_logprobs if d.prompt_logprobs is not None else (None,) * (len(d.prompt_token_ids) - 1)
            parts.append(self.completion_lp.render(d.prompt_token_ids, entries, first_is_unscored=True))
        if d.token_ids:
            parts.append(self.completion_lp.render(d.token_ids, d.logprobs or (None,) * len(d.token_ids)))
        return merge_completion_logprobs(parts)


async def _complete(service: GenerationService, inp: GenerationInput, tier: TierPolicy, chat: bool,
                    headers=None, with_ids: bool = False) -> Response:
    n = inp.n
    parts: list[list[str]] = [[] for _ in range(n)]
    ids: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[dict]] = [[] for _ in range(n)]
    finals: list[Delta | None] = [None] * n
    renderers = [_Choice(service, inp, chat) for _ in range(n)]
    try:
        async for d in service.generate(inp, tier, headers):
            r = renderers[d.index]
            parts[d.index].append(r.echo_text(d) + d.text)
            ids[d.index].extend(d.token_ids)
            lp = r.logprobs(d)
            if lp is not None:
                lps[d.index].append(lp)
            if d.finish_reason is not None:
                finals[d.index] = d
    except Exception as exc:  # noqa: BLE001
        return error_response(exc)
    last = next(f for f in finals if f is not None)
    base = {"id": ("chatcmpl-" if chat else "cmpl-") + last.request_id, "created": int(time.time()),
            "model": service.model_name,
            "usage": _usage(last, sum(f.completion_tokens for f in finals if f is not None))}
    choices = []
    for i in range(n):
        f = finals[i] or last
        finish = FINISH_TO_OPENAI.get(f.finish_reason or "", f.finish_reason)
        text = "".join(parts[i])
        if chat:
            logprobs = None
            if inp.logprobs is not None:
                logprobs = {"content": [c for p in lps[i] for c in p["content"]], "refusal": None}
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish}
        else:
            logprobs = merge_completion_logprobs(lps[i]) if lps[i] else None
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if with_ids:
            choice["token_ids"] = ids[i]
        choices.append(choice)
    return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion", "choices": choices})


async def _stream(service: GenerationService, inp: GenerationInput, tier: TierPolicy, chat: bool,
                  include_usage: bool, headers=None, with_ids: bool = False) -> Response:
    agen = service.generate(inp, tier, headers)
    try:
        first = await agen.__anext__()
    except Exception as exc:  # noqa: BLE001 - admission / validation / scheduler errors keep their status
        await agen.aclose()
        return error_response(exc)
    created = int(time.time())
    rid = ("chatcmpl-" if chat else "cmpl-") + first.request_id
    obj = "chat.completion.chunk" if chat else "text_completion"
    renderers = [_Choice(service, inp, chat) for _ in range(inp.n)]
    with_tokens = with_ids or inp.logprobs is not None  # a chunk per token even while its text is held back

    def event(choices: list, usage: dict | None = None) -> bytes:
        payload = {"id": rid, "object": obj, "created": created, "model": service.model_name, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

    def choice(d: Delta) -> dict:
        finish = FINISH_TO_OPENAI.get(d.finish_reason, d.finish_reason) if d.finish_reason else None
        r = renderers[d.index]
        if chat:
            out = {"index": d.index, "delta": {"content": d.text} if d.text else {}, "logprobs": r.logprobs(d),
                   "finish_reason": finish}
        else:
            out = {"index": d.index, "text": r.echo_text(d) + d.text, "logprobs": r.logprobs(d),
                   "finish_reason": finish}
        if with_ids:
            out["token_ids"] = list(d.token_ids)
        return out

    async def body() -> AsyncIterator[bytes]:
        try:
            if chat:
                for i in range(inp.n):
                    yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            d: Delta | None = first
            num_finished, completion_tokens = 0, 0
            while d is not None:
                if d.text or d.finish_reason or d.prompt_token_ids is not None or (d.token_ids and with_tokens):
                    yield event([choice(d)])
                if d.finish_reason:
                    num_finished += 1
                    completion_tokens += d.completion_tokens
                    if num_finished == inp.n:
                        if include_usage:
                            yield event([], _usage(d, completion_tokens))
                        break
                d = await anext(agen, None)
            yield b"data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - headers are gone; report in-band like OpenAI does
            err = json.loads(error_response(exc).body)
            yield b"data: " + json.dumps(err).encode() + b"\n\n" + b"data: [DONE]\n\n"
        finally:
            await agen.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

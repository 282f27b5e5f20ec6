"""``bench-serve --http URL``: the same replay over OpenAI-compatible HTTP, so it can drive any server.

Each request is a streamed ``POST /v1/completions`` sent at its arrival time with
``ignore_eos``, ``max_tokens`` = its output length and ``return_token_ids`` (a vLLM
extension this gateway honours too), so tokens are counted exactly, not guessed
from text chunks. A request's tier travels the way the server understands it:

* this project's gateway: the tier's API key in ``Authorization: Bearer`` (``--api-keys`` etc.);
* vLLM with ``--scheduling-policy priority``: ``--priority`` adds vLLM's ``priority``
  body field, 0 for paying and 1 for free (vLLM serves lower values first).

Metrics come from :class:`simulator.metrics.MetricsCollector` with this process's clock,
exactly as in the gRPC replay, so both servers are judged by the same code.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

from simulator.workloads import clip_lengths

# vLLM's priority field: lower is served first
TIER_PRIORITY = {"paying": 0, "free": 1}


def request_record(item, rec, prompt_len: int, output_len: int, finish: str | None) -> dict[str, Any]:
    """One ``--records-out`` line: the workload item, what was sent, and what came back."""
    return {"req_id": item.req_id, "tier": item.tier, "arrival_s": item.arrival_s, "prompt_len": prompt_len,
            "output_len": output_len, "num_tokens": rec.num_tokens, "first_token_s": rec.first_token_s,
            "last_token_s": rec.last_token_s, "finish_reason": finish}


def served_model(base_url: str, api_key: str | None = None) -> str:
    """The first model id the server lists at ``/v1/models`` (asked with ``api_key`` where keys are required)."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=headers, timeout=10.0)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def _token_count(choice: dict[str, Any]) -> int:
    ids = choice.get("token_ids")
    if ids is not None:
        return len(ids)
    return 1 if choice.get("text") else 0  # a server without return_token_ids: one token per text chunk


async def sse_lines(resp):
    """The response's lines split on LF only. SSE ends lines with LF (or CRLF); httpx's ``aiter_lines``
    splits like ``str.splitlines``, also on U+2028, U+0085 and other separators that a server may send
    unescaped inside a JSON string of generated text, which cut a chunk in two."""
    buf = b""
    async for data in resp.aiter_bytes():
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", "replace")


async def replay_http(base_url: str, items: list, builder, keys: dict[str, str | None], priority: bool = False,
                      max_prompt: int = 0, max_output: int = 0, timeout_s: float = 600.0) -> tuple[Any, dict]:
    """Send every item at its arrival time over HTTP; return (MetricsCollector, extra counters)."""
    import httpx

    from simulator.metrics import MetricsCollector

    model = served_model(base_url, next((k for k in keys.values() if k), None))
    collector = MetricsCollector()
    errors: Counter = Counter()
    records: list[dict] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    client = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout_s), limits=limits)
    t0 = time.monotonic() + 0.2

    async def one(index: int, item) -> None:
        p_len, o_len = clip_lengths(item.prompt_len, item.output_len, max_prompt, max_output, builder.max_model_len)
        body: dict[str, Any] = {"model": model, "prompt": builder.prompt(p_len, index), "max_tokens": o_len,
                                "stream": True, "ignore_eos": True, "return_token_ids": True}
        if priority:
            body["priority"] = TIER_PRIORITY[item.tier]
        key = keys.get(item.tier)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        collector.register(item.req_id, item.arrival_s, item.tier, item.tbt_slo_s, p_len, o_len)
        delay = t0 + item.arrival_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        finish = None
        try:
            async with client.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    errors[f"HTTP_{resp.status_code}"] += 1
                    finish = f"error:HTTP_{resp.status_code}"
                else:
                    async for line in sse_lines(resp):
                        if not line.startswith("data:") or line.strip() == "data: [DONE]":
                            continue
                        chunk = json.loads(line[5:])
                        for choice in chunk.get("choices", ()):
                            finish = choice.get("finish_reason") or finish
                            n = _token_count(choice)
                            if n or choice.get("finish_reason"):
                                collector.on_token(item.req_id, time.monotonic() - t0, n,
                                                   choice.get("finish_reason"))
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            errors[type(exc).__name__] += 1
            finish = f"error:{type(exc).__name__}"
        records.append(request_record(item, collector.records[item.req_id], p_len, o_len, finish))

    wall0 = time.monotonic()
    try:
        await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))
    finally:
        await client.aclose()
    extra = {"num_rejected": errors.get("HTTP_429", 0), "num_errors": sum(errors.values()),
             "errors_by_code": dict(errors), "wall_time_s": time.monotonic() - wall0, "_records": records}
    return collector, extra

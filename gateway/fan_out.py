"""``n > 1``: one prompt, n completions, run as n scheduler requests and merged into one stream.

Completion ``i`` is the request ``<request_id>-<i>`` with seed ``seed + i`` (or none, when the request
has none: each then draws independently), so a seeded ``n`` request repeats. The prompt is tokenized
once; admission holds one slot per completion (gateway/service.py). Sharing the prompt's KV is the
scheduler's prefix cache's job, not the gateway's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from gateway.prepare import Prepared
from gateway.scheduler_client import sub_request
from gateway.types import Delta
from gateway.validation import clip

_DONE = object()


def fan_out(prep: Prepared, n: int, taken: Callable[[str], bool]) -> list[Prepared]:
    """The ``n`` sub-requests of a prepared request; ValueError if an id is in flight already."""
    out = []
    for i in range(n):
        sub = sub_request(prep.submit, i)
        if taken(sub.request_id):
            raise ValueError(f"request_id: {clip(sub.request_id)} is already in flight")
        out.append(Prepared(sub.request_id, prep.prompt_ids, prep.max_tokens, sub))
    return out


async def merge_streams(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """The deltas of all ``streams`` as they come; the first error ends the merged stream.

    A bounded queue keeps each stream's own flow control: a client that stops reading stops the pumps,
    and each sub-request's buffer then bounds and times out as a single request's would.
    """
    queue: asyncio.Queue = asyncio.Queue(maxsize=2 * len(streams))

    async def pump(s: AsyncIterator[Delta]) -> None:
        try:
            async for d in s:
                await queue.put(d)
            await queue.put(_DONE)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(exc)

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pump(s)) for s in streams]
    try:
        remaining = len(streams)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()

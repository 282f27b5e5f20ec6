"""A bounded hand-off between a request's Submit stream and its client.

The gateway reads the scheduler's ``TokenEvent`` stream in one task (the reader)
and delivers to the client in another (the consumer: the SSE body or the gRPC
``Generate`` handler). A client that stops reading blocks its consumer (the HTTP
socket's or the HTTP/2 stream's flow control), never the reader. The reader
coalesces the token ids of the events it could not hand over yet into this
buffer, so memory is bounded in tokens. Once the buffer holds ``max_tokens``
tokens the reader stops reading and waits for the consumer; if nothing is taken
for ``stall_timeout_s`` the caller aborts the request (docs/gateway.md, "Slow
and stalled clients").
"""

from __future__ import annotations

import asyncio

# The stream ended without a finish reason: aborted (Abort, a stall) or the scheduler closed it.
ABORTED = object()


class TokenBuffer:
    """Token ids not yet taken by the consumer, then how the stream ended.

    One producer (``push`` / ``close``, ``wait_for_room``) and one consumer
    (``take``), both on the event loop.
    """

    __slots__ = ("_consumer", "_end", "_ids", "_lps", "_producer", "max_tokens", "stall_timeout_s")

    def __init__(self, max_tokens: int, stall_timeout_s: float) -> None:
        self.max_tokens = max_tokens
        self.stall_timeout_s = stall_timeout_s
        self._ids: list[int] = []
        self._lps: list | None = None  # per-token logprobs aligned with _ids, once any event carried some
        self._end: object | None = None  # the final event, an exception, or ABORTED
        self._consumer: asyncio.Future | None = None  # set while take() waits
        self._producer: asyncio.Future | None = None  # set while wait_for_room() waits

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    @property
    def full(self) -> bool:
        return len(self._ids) >= self.max_tokens

    # ------------------------------------------------------------ producer
    def push(self, token_ids, logprobs=None) -> None:
        """Append one event's token ids (the buffer may exceed ``max_tokens`` by one event), and their
        logprobs (a value per id) if the event has any."""
        if token_ids:
            self._add_logprobs(len(token_ids), logprobs)
            self._ids.extend(token_ids)
            _wake(self._consumer)

    def close(self, end: object, token_ids=(), logprobs=None) -> None:
        """End the stream: ``end`` is the final event, an exception, or ``ABORTED``."""
        if self._end is None:
            self._add_logprobs(len(token_ids), logprobs)
            self._ids.extend(token_ids)
            self._end = end
            _wake(self._consumer)

    def _add_logprobs(self, n: int, logprobs) -> None:
        if logprobs is None and self._lps is None:
            return
        if self._lps is None:
            self._lps = [None] * len(self._ids)
        self._lps.extend(logprobs if logprobs is not None else [None] * n)

    async def wait_for_room(self) -> bool:
        """Wait while the buffer is full: True once the consumer took it, False after
        ``stall_timeout_s`` without a take (the client has stalled; 0 = no limit)."""
        if not self.full:
            return True
        self._producer = fut = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.stall_timeout_s or None):  # 0: wait as long as it takes
                await fut
        except TimeoutError:
            return False
        finally:
            self._producer = None
        return True

    # ------------------------------------------------------------ consumer
    async def take(self) -> tuple[list[int], object | None]:
        """Everything buffered: ``(token_ids, end)``; waits until there is something.

        ``end`` is None while the stream goes on; once set, later calls return it again.
        """
        ids, _, end = await self.take_with_logprobs()
        return ids, end

    async def take_with_logprobs(self) -> tuple[list[int], list | None, object | None]:
        """:meth:`take` plus the ids' logprobs (None when no event carried any)."""
        while not self._ids and self._end is None:
            self._consumer = fut = asyncio.get_running_loop().create_future()
            try:
                await fut
            finally:
                self._consumer = None
        ids, self._ids = self._ids, []
        lps, self._lps = self._lps, None
        _wake(self._producer)
        return ids, lps, self._end


def _wake(fut: asyncio.Future | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)

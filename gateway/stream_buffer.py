"""A bounded hand-off between a request's events and its client.

The Session stream's reader files each token event of a request straight into its
buffer (``gateway/scheduler_session.py``), and the client side takes from it (the
consumer: the SSE body or the gRPC ``Generate`` handler). A client that stops
reading blocks its consumer (the HTTP socket's or the HTTP/2 stream's flow
control), never the reader, which is shared by every request. The buffer
coalesces the token ids the consumer has not taken yet, so a client that fell
behind gets them in one chunk. Once the buffer holds ``max_tokens`` tokens and
nothing is taken for ``stall_timeout_s``, ``on_stall`` runs and the caller aborts
the request (docs/gateway.md, "Slow and stalled clients"); the request then
produces nothing more, so what the buffer holds stays bounded by that.
"""

from __future__ import annotations

import asyncio

# The stream ended without a finish reason: aborted (Abort, a stall) or the scheduler closed it.
ABORTED = object()


class TokenBuffer:
    """Token ids not yet taken by the consumer, then how the stream ended.

    One producer (``push`` / ``close``) and one consumer (``take``), both on the event loop.
    """

    __slots__ = ("_consumer", "_end", "_ids", "_lps", "_stall_timer", "max_tokens", "on_stall", "stall_timeout_s")

    def __init__(self, max_tokens: int, stall_timeout_s: float, on_stall=None) -> None:
        self.max_tokens = max_tokens
        self.stall_timeout_s = stall_timeout_s
        self.on_stall = on_stall  # called once the buffer was full with nothing taken for stall_timeout_s
        self._ids: list[int] = []
        self._lps: list | None = None  # per-token logprobs aligned with _ids, once any event carried some
        self._end: object | None = None  # the final event, an exception, or ABORTED
        self._consumer: asyncio.Future | None = None  # set while take() waits
        self._stall_timer: asyncio.TimerHandle | None = None  # armed while full and not taken

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    @property
    def full(self) -> bool:
        return len(self._ids) >= self.max_tokens

    # ------------------------------------------------------------ producer
    def push(self, token_ids, logprobs=None) -> None:
        """Append one event's token ids and their logprobs (a value per id) if the event has any.

        The buffer may go past ``max_tokens``: the shared stream is never paused for one request.
        Going full arms the stall timer (``stall_timeout_s``; 0 = never). Nothing is added after the end."""
        if token_ids and self._end is None:
            if logprobs is not None or self._lps is not None:
                self._add_logprobs(len(token_ids), logprobs)
            ids = self._ids
            ids.extend(token_ids)
            c = self._consumer
            if c is not None and not c.done():
                c.set_result(None)
            if (len(ids) >= self.max_tokens and self._stall_timer is None and self.on_stall is not None
                    and self.stall_timeout_s > 0):
                self._stall_timer = asyncio.get_running_loop().call_later(self.stall_timeout_s, self._stalled)

    def close(self, end: object, token_ids=(), logprobs=None) -> None:
        """End the stream: ``end`` is the final event, an exception, or ``ABORTED`` (later calls do nothing)."""
        if self._end is None:
            self._add_logprobs(len(token_ids), logprobs)
            self._ids.extend(token_ids)
            self._end = end
            self._disarm()
            _wake(self._consumer)

    def _add_logprobs(self, n: int, logprobs) -> None:
        if logprobs is None and self._lps is None:
            return
        if self._lps is None:
            self._lps = [None] * len(self._ids)
        self._lps.extend(logprobs if logprobs is not None else [None] * n)

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._end is None and self.on_stall is not None:
            self.on_stall()

    def _disarm(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

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
        if self._stall_timer is not None:
            self._disarm()
        return ids, lps, self._end


def _wake(fut: asyncio.Future | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)

"""Admission: a bounded count of generation requests, taken before any costly work.

Every generation request holds one :class:`Slot` from the moment it is
admitted until its response ends, whatever happens in between: reading the
HTTP body, parsing, tokenizing, Submit and streaming. ``--max-concurrent-requests``
bounds the number of slots; a request that finds none is rejected at once
(``AdmissionRejected``: RESOURCE_EXHAUSTED / 429 with a retry hint).

The HTTP front end takes its slot before FastAPI sees the request
(:class:`gateway.http_guard.AdmissionGate`), so a rejection costs neither the
body read nor JSON parsing. It runs the rest of the request inside
:func:`holding`, and :meth:`gateway.service.GenerationService.generate` claims
that slot instead of taking a second one. A gRPC call (whose message gRPC has
already read) takes its slot in ``generate`` itself.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

from wire.grpc_server import AdmissionRejected

RETRY_AFTER_S = 1.0


class Slot:
    """One admitted request's place; :meth:`release` frees it (only the first call counts)."""

    __slots__ = ("_admission", "released", "claimed")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.released = False
        self.claimed = False  # a generate() call runs under it

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._in_use -= 1


class Admission:
    """At most ``limit`` slots in use at once (single event loop: no locking)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("admission limit must be >= 1")
        self.limit = limit
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    def check(self) -> None:
        """``AdmissionRejected`` when all ``limit`` slots are taken."""
        if self._in_use >= self.limit:
            raise AdmissionRejected(f"gateway is full ({self.limit} requests in flight)", retry_after_s=RETRY_AFTER_S)

    def acquire(self) -> Slot:
        """A slot, or ``AdmissionRejected`` when all ``limit`` are taken."""
        self.check()
        self._in_use += 1
        return Slot(self)

    def acquire_many(self, k: int) -> list[Slot]:
        """``k`` slots at once (the other completions of an ``n > 1`` request), or none and
        ``AdmissionRejected`` when fewer than ``k`` are free."""
        if self._in_use + k > self.limit:
            raise AdmissionRejected(f"gateway is full ({self._in_use} of {self.limit} requests in flight; "
                                    f"this one needs {k} more for its n completions)",
                                    retry_after_s=RETRY_AFTER_S)
        self._in_use += k
        return [Slot(self) for _ in range(k)]


# The slot of the HTTP request this task serves (None on gRPC calls and outside requests).
_current: ContextVar[Slot | None] = ContextVar("slai_gateway_admission_slot", default=None)


@contextlib.contextmanager
def holding(slot: Slot) -> Iterator[Slot]:
    """Run a request under ``slot`` (visible to :func:`current_slot`); release it on any exit."""
    token = _current.set(slot)
    try:
        yield slot
    finally:
        _current.reset(token)
        slot.release()


def current_slot() -> Slot | None:
    """The unreleased slot the current request already holds, if any."""
    slot = _current.get()
    return slot if slot is not None and not slot.released else None

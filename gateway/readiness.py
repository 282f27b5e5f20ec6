"""Is the gateway ready? Only while its scheduler says SERVING, and never while it drains.

A gateway whose scheduler is down cannot serve anything (every request would get
UNAVAILABLE / 503), so its own health must say so: load balancers and
orchestrators read ``grpc.health.v1`` (``""`` and ``slai.v1.GatewayService``) or
``GET /health``. :class:`SchedulerWatcher` asks the scheduler's
``grpc.health.v1`` ``Check`` every ``interval_s`` on the gateway's scheduler
channel and flips :class:`Readiness` (read by ``/health``) and the gateway's gRPC
health together. The scheduler itself is NOT_SERVING while it has no ready
executor, which the gateway then reports too.

Requests are not gated on this state: they already fail fast with UNAVAILABLE
(``wait_for_ready=False`` on Submit), and a possibly stale flag must not turn
away a request once the scheduler is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


class Readiness:
    """The gateway's readiness and why it is not ready (shared by gRPC health and ``/health``)."""

    def __init__(self) -> None:
        self.scheduler_ok = False
        self.scheduler_reason = "the scheduler has not been checked yet"
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.scheduler_ok and not self.draining

    def why_not(self) -> str:
        """Why the gateway is not ready ("" when it is)."""
        if self.draining:
            return "the gateway is shutting down"
        return "" if self.scheduler_ok else self.scheduler_reason


class SchedulerWatcher:
    """Polls ``check()`` -> ``(ok, reason)`` every ``interval_s``; calls ``on_change(ready)`` when readiness flips."""

    def __init__(self, check: Callable[[], Awaitable[tuple[bool, str]]], readiness: Readiness,
                 on_change: Callable[[bool], Awaitable[None]], interval_s: float = 0.5) -> None:
        if not interval_s > 0:
            raise ValueError(f"health check interval must be > 0, got {interval_s}")
        self._check = check
        self.readiness = readiness
        self._on_change = on_change
        self.interval_s = interval_s
        self._task: asyncio.Task | None = None
        self._reported: bool | None = None  # what on_change last said

    async def check_once(self) -> bool:
        """One check; updates readiness and reports a change. Returns whether the gateway is ready."""
        ok, reason = await self._check()
        r = self.readiness
        if ok != r.scheduler_ok:
            if ok:
                log.info("scheduler is serving again; the gateway is ready")
            else:
                log.warning("gateway not ready: %s", reason)
        r.scheduler_ok, r.scheduler_reason = ok, reason
        if r.ready != self._reported:
            self._reported = r.ready
            await self._on_change(r.ready)
        return r.ready

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler-health-watcher")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failed check
                log.exception("scheduler health check failed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

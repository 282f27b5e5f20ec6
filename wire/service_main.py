"""What every service's command does around its own work: logging, tracing, a clean exit on bad
configuration, and a drain when SIGTERM or SIGINT arrives.

    def run(args) -> int:
        return run_service(args.log_level, lambda: _main(args), log)

    async def _main(args) -> int:
        server = await start(...)                      # the service's own work
        await serve_until_signal(lambda: server.stop(grace_s), log, grace_s)
        return 0
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from telemetry import tracing
from wire.grpc_server import wait_for_stop_signal

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def run_service(log_level: str, main: Callable[[], Awaitable[int | None]], log: logging.Logger) -> int:
    """Configure logging and run ``main`` to completion; a ``ValueError`` (bad flag value or configuration,
    e.g. the service token or its exposure) is logged as one line and exits 2, with no traceback."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    try:
        return int(asyncio.run(main()) or 0)
    except ValueError as exc:
        log.error("%s", exc)
        return 2


async def serve_until_signal(stop: Callable[[], Awaitable[None]], log: logging.Logger, grace_s: float) -> None:
    """Wait for SIGTERM / SIGINT, then drain with ``stop`` (which gives in-flight work ``grace_s``)
    and flush the traces."""
    await wait_for_stop_signal()
    log.info("draining (%.1f s)", grace_s)
    await stop()
    tracing.shutdown_tracing()

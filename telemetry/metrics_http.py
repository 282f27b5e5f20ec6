"""Serving a registry on ``/metrics``: a side port for the gRPC-only services, a route for the gateway.

Ports: ``SLAI_METRICS_PORT`` overrides the defaults in ``telemetry.names`` (scheduler
9101, executor 9102; the gateway serves on its HTTP port 8000). ``-1`` turns serving off. The host is the
service's ``--metrics-host``, by default its ``--host`` (loopback unless told otherwise).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, start_http_server

from telemetry import names as N

log = logging.getLogger(__name__)


def metrics_port(default: int) -> int:
    """``SLAI_METRICS_PORT`` if set (``-1`` = off, ``0`` = any free port), else ``default``."""
    raw = os.environ.get(N.METRICS_PORT_ENV, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{N.METRICS_PORT_ENV} must be an integer port, got {raw!r}") from None


def start_metrics_server(port: int, registry: CollectorRegistry, addr: str = "127.0.0.1") -> tuple[Any, int] | None:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    ``addr``: the listen host, loopback unless told otherwise; the services pass their ``--host``
    (or ``--metrics-host``), so a stack on loopback never exposes /metrics beyond it.

    Returns ``(server, bound_port)`` (``port=0`` picks one; call ``server.shutdown()`` to stop) or None when
    ``port < 0``.
    """
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d%s", addr, bound, N.METRICS_PATH)
    return server, bound


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def add_metrics_route(app: Any, *registries: CollectorRegistry, path: str = N.METRICS_PATH) -> None:
    """Add ``GET /metrics`` to a FastAPI/Starlette ``app`` rendering ``registries`` (concatenated).

    The gateway passes its own registry; an in-process deployment may add the others.
    """
    from starlette.responses import Response

    async def metrics_endpoint(_request: Any = None) -> Response:
        body = b"".join(generate_latest(r) for r in registries)
        return Response(content=body, media_type=CONTENT_TYPE_LATEST)

    app.add_route(path, metrics_endpoint, methods=["GET"], include_in_schema=False)

"""The gateway's exceptions for the scheduler's statuses (of a call, or a Session's ``RequestError``).

``AdmissionRejected`` (RESOURCE_EXHAUSTED) keeps the scheduler's retry-after hint; UNAVAILABLE is
``ConnectionError``, which pool routing (``gateway/pools.py``) answers by failing over.
"""

from __future__ import annotations

import logging

import grpc

from wire.grpc_server import AdmissionRejected
from wire.pb.slai.v1 import common_pb2, scheduler_pb2

log = logging.getLogger(__name__)


def is_final(ev: scheduler_pb2.TokenEvent) -> bool:
    """The event that ends a request's stream (it carries the finish reason, usage and timings)."""
    return ev.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


def scheduler_error(exc: grpc.aio.AioRpcError) -> Exception:
    """Translate the scheduler's status into the gateway's exception of the same meaning."""
    retry = 1.0
    for key, value in (exc.trailing_metadata() or ()):
        if key == "retry-after-s":
            try:
                retry = float(value)
            except ValueError:
                pass
    return status_error(exc.code(), exc.details() or "", retry)


def status_error(code: grpc.StatusCode, details: str, retry_after_s: float = 1.0) -> Exception:
    """The gateway's exception for a scheduler status (a call's, or a Session's ``RequestError``)."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return AdmissionRejected(f"scheduler is full: {details}", retry_after_s=retry_after_s or 1.0)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ConnectionError(f"scheduler unavailable: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return LookupError(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # the gateway's own configuration is wrong, not the client's request: a 503 naming the fix
        log.error("the scheduler refused the gateway: %s", details)
        return ConnectionError(f"scheduler unavailable: it refused this gateway's service token ({details}); "
                               "give the gateway the scheduler's SLAI_SERVICE_TOKEN")
    return RuntimeError(f"scheduler error {code.name}: {details}")


def error_from_pb(err: scheduler_pb2.RequestError) -> Exception:
    """A Session's per-request error as the gateway's exception."""
    code = _STATUS_BY_VALUE.get(err.code, grpc.StatusCode.UNKNOWN)
    return status_error(code, err.message, err.retry_after_s)


_STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}

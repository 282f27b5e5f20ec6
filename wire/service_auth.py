"""Trust between slai-serve's own services: a shared token on every scheduler and executor RPC.

The scheduler and the executors trust their callers completely (a caller picks its
own tier and TBT objective, or lays out KV blocks), so only the gateway and the
scheduler may call them. They prove it with one shared secret, the *service token*:

* where it comes from: ``--service-token-file PATH``, else the file named by
  ``SLAI_SERVICE_TOKEN_FILE``, else ``SLAI_SERVICE_TOKEN`` itself (never a flag
  holding the secret: ``ps`` shows argv);
* on the wire: gRPC metadata ``x-slai-service-token: <token>`` (a key of its own,
  so it is never mistaken for a client's API key in ``authorization``);
* on the server: :class:`ServiceTokenInterceptor` compares it with
  ``hmac.compare_digest`` and answers UNAUTHENTICATED when it is missing or wrong.
  ``grpc.health.v1`` and server reflection stay open: compose and Kubernetes
  probes carry no secret, and neither reveals more than the public protos do;
* without a token a service listening beyond loopback refuses to start unless
  ``--insecure-no-auth`` is given (:func:`check_exposure`); see docs/gateway.md, *Security*.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import grpc

from wire.rpc_handlers import rebuild_handler

log = logging.getLogger(__name__)

SERVICE_TOKEN_ENV = "SLAI_SERVICE_TOKEN"
SERVICE_TOKEN_FILE_ENV = "SLAI_SERVICE_TOKEN_FILE"
METADATA_KEY = "x-slai-service-token"
MIN_TOKEN_LEN = 16
# Services a caller may use without the token (probes, and the schema that protos/ already publishes).
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})


def _checked(token: str, source: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_LEN:
        raise ValueError(f"{source}: the service token must have at least {MIN_TOKEN_LEN} characters "
                         f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if not all(33 <= ord(c) < 127 for c in token):  # what a gRPC metadata value may hold
        raise ValueError(f"{source}: the service token must be printable ASCII without spaces")
    return token


def read_service_token(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The configured service token, or "" when none is configured.

    ``path`` (a ``--service-token-file`` flag) wins over ``SLAI_SERVICE_TOKEN_FILE``, which wins over
    ``SLAI_SERVICE_TOKEN``. ValueError (naming the source) for an unreadable file or a malformed token.
    """
    env = os.environ if environ is None else environ
    path = path or env.get(SERVICE_TOKEN_FILE_ENV, "")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"service token file {str(path)!r}: {exc.strerror or exc}") from None
        return _checked(text, f"service token file {str(path)!r}")
    raw = env.get(SERVICE_TOKEN_ENV, "")
    return _checked(raw, SERVICE_TOKEN_ENV) if raw.strip() else ""


def call_metadata(token: str, extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...] | None:
    """``metadata=`` for an outgoing scheduler/executor call: ``extra`` plus the token (None when both are empty)."""
    out = (*extra, (METADATA_KEY, token)) if token else tuple(extra)
    return out or None


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); a host name is not assumed local."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(service: str, host: str | None, token: str, insecure_no_auth: bool) -> None:
    """Refuse an unauthenticated service on a non-loopback host (ValueError), unless ``insecure_no_auth``.

    ``host`` None: a unix socket, protected by its file permissions.
    """
    if token:
        log.info("%s: every RPC needs the service token (health and reflection stay open)", service)
        return
    if host is None or is_loopback_host(host):
        log.info("%s: no service token; any local process that reaches %s may call it", service,
                 "the socket" if host is None else host)
        return
    if not insecure_no_auth:
        raise ValueError(
            f"--host {host} exposes the {service} beyond this machine, and no service token is configured: "
            f"set {SERVICE_TOKEN_ENV} (or --service-token-file / {SERVICE_TOKEN_FILE_ENV}) here and in its "
            f"callers, or pass --insecure-no-auth to accept calls from anyone who can reach the port")
    log.warning("!!! %s on %s WITHOUT AUTHENTICATION (--insecure-no-auth): anyone who reaches this port can "
                "submit work with any tier and objective; set %s to require a token !!!", service, host,
                SERVICE_TOKEN_ENV)


def add_arguments(parser: argparse.ArgumentParser, listener: bool = True) -> None:
    """``--service-token-file`` (every service) and, for the scheduler and executor, ``--insecure-no-auth``."""
    parser.add_argument("--service-token-file", default=None, metavar="PATH",
                        help=f"file holding the shared service token (default: ${SERVICE_TOKEN_FILE_ENV}, "
                             f"else the token in ${SERVICE_TOKEN_ENV}; none: no token)")
    if listener:
        parser.add_argument("--insecure-no-auth", action="store_true",
                            help="allow listening beyond loopback without a service token (anyone reaching the "
                                 "port can then call every RPC)")


class _RejectLog:
    """Warn about rejected calls at most every ``every_s`` seconds (a flood must not flood the log)."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.last_s = -float("inf")
        self.suppressed = 0

    def note(self, method: str, peer: str, reason: str) -> None:
        now = time.monotonic()
        if now - self.last_s < self.every_s:
            self.suppressed += 1
            return
        more = f" (+{self.suppressed} more since the last report)" if self.suppressed else ""
        log.warning("refused %s from %s: %s%s", method, peer, reason, more)
        self.last_s, self.suppressed = now, 0


class ServiceTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call without the right ``x-slai-service-token``, except ``open_services``."""

    def __init__(self, token: str, open_services: frozenset[str] = OPEN_SERVICES) -> None:
        if not token:
            raise ValueError("ServiceTokenInterceptor needs a non-empty token")
        self._expected = token.encode()
        self._open = open_services
        self._rejects = _RejectLog()

    def _reason(self, metadata) -> str | None:
        """None when the call carries the token, else why not."""
        presented = None
        for key, value in metadata or ():
            if key == METADATA_KEY:
                presented = value
        if presented is None:
            return (f"missing service token: send gRPC metadata '{METADATA_KEY}' "
                    f"(the value of {SERVICE_TOKEN_ENV} this service runs with)")
        raw = presented if isinstance(presented, bytes) else str(presented).encode()
        if not hmac.compare_digest(raw, self._expected):  # constant time: no timing hint about the prefix
            return f"invalid service token in '{METADATA_KEY}'"
        return None

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method or ""
        if method.lstrip("/").split("/", 1)[0] in self._open:
            return await continuation(handler_call_details)
        reason = self._reason(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if reason is None or handler is None:  # None: an unknown method stays UNIMPLEMENTED
            return handler
        return self._deny(handler, method, reason)

    def _deny(self, handler: grpc.RpcMethodHandler, method: str, reason: str) -> grpc.RpcMethodHandler:
        async def deny(_request, context: grpc.aio.ServicerContext):
            self._rejects.note(method, context.peer(), reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        # the same kind of handler as the real one, so the request (stream) is framed as the client sends it
        return rebuild_handler(handler, lambda *_: deny)

__all__ = ["METADATA_KEY", "OPEN_SERVICES", "SERVICE_TOKEN_ENV", "SERVICE_TOKEN_FILE_ENV", "ServiceTokenInterceptor",
           "add_arguments", "call_metadata", "check_exposure", "is_loopback_host", "read_service_token"]

"""Rebuilding a gRPC method handler around new behaviour: what every server interceptor here returns."""

from __future__ import annotations

from typing import Any, Callable

import grpc

# (attribute of grpc.RpcMethodHandler, its factory, request streaming, response streaming)
_HANDLER_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, False, True),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, True, False),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True, True),
)


def rebuild_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Any, bool, bool], Any],
                    request_deserializer: Any = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` whose behaviour is ``wrap(fn, request_streaming,
    response_streaming)`` (what server interceptors return); the request framing stays the client's."""
    for attr, factory, request_streaming, response_streaming in _HANDLER_KINDS:
        fn = getattr(handler, attr)
        if fn:
            return factory(wrap(fn, request_streaming, response_streaming),
                           request_deserializer or handler.request_deserializer, handler.response_serializer)
    return handler

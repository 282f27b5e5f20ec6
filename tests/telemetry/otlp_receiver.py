"""An in-process OTLP/gRPC trace receiver: no collector needed (CI machines cannot run one).

    with OtlpReceiver() as rx:
        telemetry.init_tracing("svc", endpoint=rx.endpoint)
        ...
        telemetry.shutdown_tracing()      # flushes the BatchSpanProcessor
        names = [s.name for _, s in rx.spans()]
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Stores every ExportTraceServiceRequest it receives."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.endpoint = ""

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:  # noqa: N802
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> str:
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"127.0.0.1:{port}"
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def spans(self) -> list[tuple[str, Any]]:
        """(service.name, protobuf Span) for every span received so far."""
        out = []
        with self._lock:
            for req in self.requests:
                for rs in req.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                                   "")
                    for ss in rs.scope_spans:
                        out.extend((service, span) for span in ss.spans)
        return out

    def __enter__(self) -> OtlpReceiver:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

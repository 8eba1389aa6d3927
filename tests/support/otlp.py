"""An OTLP/HTTP trace receiver on loopback, for the tracing tests and the observability bench.

``POST /v1/traces`` takes a protobuf ``ExportTraceServiceRequest`` (gzip-encoded or not),
as the SDK's OTLP/HTTP exporter sends it, and answers as a collector does. The receiver
counts the spans it was sent (``count``) and, unless ``keep=False`` (a bench's hundreds of
thousands of spans), keeps each as a ``Span`` with its ids, parent and attributes.
"""

from __future__ import annotations

import gzip
import threading
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.support.loopback import LoopbackServer

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start: int
    attributes: dict[str, Any]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver:
    """Serves ``POST /v1/traces`` inside ``with``; ``endpoint`` is what
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` should say."""

    def __init__(self, keep: bool = True) -> None:
        self.count = 0
        self.spans: list[Span] = []
        self._keep = keep
        self._lock = threading.Lock()
        receiver = self
        reply = ExportTraceServiceResponse().SerializeToString()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                found = self.path == TRACES_PATH
                if found:
                    receiver.add(ExportTraceServiceRequest.FromString(body))
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = LoopbackServer(Handler)

    @property
    def endpoint(self) -> str:
        return f"http://{self._server.address}"

    def __enter__(self) -> Self:
        self._server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.__exit__(*exc)

    def add(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        count = 0
        for resource_spans in request.resource_spans:
            if not self._keep:
                count += sum(len(scope.spans) for scope in resource_spans.scope_spans)
                continue
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                count += len(scope_spans.spans)
                for span in scope_spans.spans:
                    spans.append(Span(
                        service=str(resource.get("service.name")), name=span.name,
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(), start=span.start_time_unix_nano,
                        attributes={kv.key: _value(kv.value) for kv in span.attributes}))
        with self._lock:
            self.count += count
            self.spans += spans

    def traces(self) -> dict[str, list[Span]]:
        """The spans kept so far, by trace id."""
        by_trace: dict[str, list[Span]] = defaultdict(list)
        with self._lock:
            for span in self.spans:
                by_trace[span.trace_id].append(span)
        return by_trace

"""The OpenTelemetry SDK, set up from the standard ``OTEL_*`` variables when they ask for traces.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an
OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``, which
means ``otlp``), unless ``OTEL_SDK_DISABLED=true``. Then spans go through a batch processor
to the OTLP/HTTP (protobuf) exporter, which reads its own variables (endpoint, headers,
timeout, compression), and the sampler is ``OTEL_TRACES_SAMPLER``'s (parent-based, always on
by default). The service is ``OTEL_SERVICE_NAME``, else the role (``aipipe-streams``, ...).

Otherwise nothing of OpenTelemetry is imported and ``aipipe.producers.tracing`` stays off.
"""

from __future__ import annotations

from typing import Any

from aipipe.infra.settings import ConfigError, Settings
from aipipe.producers import tracing

_provider: Any = None  # the SDK's TracerProvider once set up


def configure_tracing(settings: Settings, service: str) -> bool:
    """Set up the SDK and turn tracing on when the settings ask for traces; True if on."""
    global _provider
    if not settings.tracing or tracing.enabled:
        return tracing.enabled
    try:
        from opentelemetry import trace  # deferred: the SDK only when traces are asked for
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # deferred: as above
        from opentelemetry.sdk.trace import TracerProvider  # deferred: as above
        from opentelemetry.sdk.trace.export import (  # deferred: as above
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError as exc:
        raise ConfigError(
            "OTEL_* variables ask for traces but the OpenTelemetry SDK is not installed; "
            "install aipipe[workers] or unset OTEL_TRACES_EXPORTER and "
            "OTEL_EXPORTER_OTLP_ENDPOINT."
        ) from exc
    resource = Resource.create()
    if not settings.otel_service_name and str(
            resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    names = set(settings.otel_traces_exporter.split(",")) - {"", "none"} or {"otlp"}
    exporters: list[SpanExporter] = []
    if "otlp" in names:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # deferred: as above
            OTLPSpanExporter,
        )

        exporters.append(OTLPSpanExporter())
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    tracing.enable()
    return True


def flush_traces(timeout: float = 5.0) -> None:
    """Export the spans still queued (before a process ends with ``os._exit``)."""
    if _provider is not None:
        _provider.force_flush(int(timeout * 1000))

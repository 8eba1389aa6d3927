"""The OpenTelemetry SDK, set up from the standard ``OTEL_*`` variables when they ask for traces.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an
OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``, which
means ``otlp``), unless ``OTEL_SDK_DISABLED=true``. Then spans go to the OTLP/HTTP (protobuf)
exporter, which reads its own variables (endpoint, headers, timeout, compression): through
the SDK's batch processor in a command (``aipipe emit``), through a helper process in a
worker (``aipipe.infra.span_export``, which keeps the encoding off the worker's GIL). The
sampler is ``OTEL_TRACES_SAMPLER``'s (parent-based, always on by default). The service is
``OTEL_SERVICE_NAME``, else the role (``aipipe-streams``, ...).

Otherwise nothing of OpenTelemetry is imported and ``aipipe.producers.tracing`` stays off.
"""

from __future__ import annotations

from typing import Any

from aipipe.infra.settings import ConfigError, Settings
from aipipe.producers import tracing

_provider: Any = None  # the SDK's TracerProvider once set up


def configure_tracing(settings: Settings, service: str, hand_off: bool = False) -> bool:
    """Set up the SDK and turn tracing on when the settings ask for traces; True if on.

    ``hand_off`` (the workers): spans are exported by a helper process
    (``aipipe.infra.span_export``), not by a thread under this process's GIL."""
    global _provider
    if not settings.tracing or tracing.enabled:
        return tracing.enabled
    try:
        from opentelemetry import trace  # deferred: the SDK only when traces are asked for
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # deferred: as above
        from opentelemetry.sdk.trace import TracerProvider  # deferred: as above
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # deferred: as above
        from opentelemetry.sdk.trace.sampling import ParentBased  # deferred: as above

        from aipipe.infra.span_export import HandOff, exporters_named  # deferred: as above
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
    provider = TracerProvider(resource=resource)
    if hand_off:
        provider.add_span_processor(HandOff(resource, settings.otel_traces_exporter))
    else:
        for exporter in exporters_named(settings.otel_traces_exporter):
            provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    tracing.enable(follows_parent=isinstance(provider.sampler, ParentBased))
    return True


def flush_traces(timeout: float = 5.0) -> None:
    """Export the spans still queued (before a process ends with ``os._exit``)."""
    if _provider is not None:
        _provider.force_flush(int(timeout * 1000))

"""The OpenTelemetry SDK, set up from the standard ``OTEL_*`` variables when they ask for traces.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an
OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``, which
means ``otlp``), unless ``OTEL_SDK_DISABLED=true``. Then spans go to the OTLP/HTTP (protobuf)
exporter, which reads its own variables (endpoint, headers, timeout, compression): through
the SDK's batch processor in a command (``aipipe emit``), through a helper process in a
worker (``aipipe.infra.span_export``, run by ``aipipe.span_helper``: the encoding stays off
the worker's GIL). The sampler is ``OTEL_TRACES_SAMPLER``'s (parent-based, always on by
default). The service is ``OTEL_SERVICE_NAME``, else the role (``aipipe-streams``, ...).

Otherwise nothing of OpenTelemetry is imported and ``aipipe.producers.tracing`` stays off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aipipe.infra.settings import ConfigError, Settings
from aipipe.producers import tracing

_provider: Any = None  # the SDK's TracerProvider once set up


def exporters_named(names: str) -> list[Any]:
    """The SDK's span exporters for ``OTEL_TRACES_EXPORTER``-style names (``otlp,console``;
    none named: ``otlp``). The OTLP exporter reads its own ``OTEL_EXPORTER_OTLP_*``."""
    chosen = set(names.split(",")) - {"", "none"} or {"otlp"}
    exporters: list[Any] = []
    if "otlp" in chosen:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # deferred: SDK only
            OTLPSpanExporter,  # when traces are asked for
        )

        exporters.append(OTLPSpanExporter())
    if "console" in chosen:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # deferred: as above

        exporters.append(ConsoleSpanExporter())
    return exporters


def configure_tracing(settings: Settings, service: str,
                      hand_off: Callable[[Any, str], Any] | None = None) -> bool:
    """Set up the SDK and turn tracing on when the settings ask for traces; True if on.

    ``hand_off(resource, exporter_names)`` (the workers) builds the span processor that
    hands spans to a helper process (``aipipe.infra.span_export``); without it spans are
    exported by the SDK's batch processor in this process."""
    global _provider
    if not settings.tracing or tracing.enabled:
        return tracing.enabled
    try:
        from opentelemetry import trace  # deferred: the SDK only when traces are asked for
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # deferred: as above
        from opentelemetry.sdk.trace import TracerProvider  # deferred: as above
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # deferred: as above
        from opentelemetry.sdk.trace.sampling import ParentBased  # deferred: as above
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
    if hand_off is not None:
        provider.add_span_processor(hand_off(resource, settings.otel_traces_exporter))
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

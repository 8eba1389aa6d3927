"""Trace context across Kafka hops: W3C ``traceparent``/``tracestate`` headers, OpenTelemetry spans.

Off unless something turns it on, and then free: ``enabled`` is a module flag that every
call site checks first, and nothing of OpenTelemetry is imported while it is False. It
turns on when

- ``aipipe`` sets up the OpenTelemetry SDK from the ``OTEL_*`` variables
  (``aipipe.infra.tracing``), in a worker or ``aipipe emit``; or
- an ``EventProducer`` is built in a process that has set a tracer provider of its own (an
  upstream service with its own OpenTelemetry SDK), read from ``sys.modules`` without
  importing anything.

The producer starts a span per event (the current span's child, or a new trace) and puts
its context in the event's headers; each stage starts its span as the child of the context
in the headers it consumed, and the events it emits carry that span's context onward
(``inject``, called by ``headers_for``). Span attributes carry the event's ids:
``aipipe.request_id``, ``aipipe.client_id``, ``aipipe.model`` and, on a completion,
``aipipe.cost_usd``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanKind, Tracer

#: True once tracing is on in this process; every call site checks it before anything else
enabled = False
_tracer: Tracer | None = None
# True when the sampler follows a remote parent's decision (the SDK's parent-based samplers,
# as ``aipipe``'s workers set them up): a stage whose input is not sampled then passes the
# input's context on instead of building a span the sampler would drop
_follows_parent = False
_propagator: Any = None  # the W3C propagator, built on first use
_api: Any = None  # ``opentelemetry.trace``, imported on first use
_Passed: Any = None  # the span class of an unsampled parent passed on (``_unsampled``)
# the unsampled parent a stage passes on, while it is current (``within``): kept here, not in
# OpenTelemetry's context, whose attach and detach cost more than the rest of such a hop;
# None while any other span (or none) is current, which OpenTelemetry's context then holds
_passing: ContextVar[Any] = ContextVar("aipipe_passing", default=None)
# a version-00 traceparent, read without the propagator when its parent was not sampled
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16  # the invalid ids
TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
_NOTHING: AbstractContextManager[None] = nullcontext()

# the fields of an event (or a cost row) that become span attributes, under ``aipipe.``
_FIELDS = ("request_id", "client_id", "operation_id", "event_type", "operation_type",
           "provider", "model", "attempt")


def enable(follows_parent: bool = False) -> None:
    """Turn tracing on, with the global tracer provider (set it first); ``follows_parent``:
    its sampler drops every span whose remote parent was not sampled."""
    global enabled, _tracer, _follows_parent
    from opentelemetry import trace  # deferred: OpenTelemetry only when tracing is on

    _tracer = trace.get_tracer("aipipe")
    _follows_parent = follows_parent
    enabled = True


def _trace() -> Any:
    """``opentelemetry.trace`` (imported once: an import statement per call costs more than
    the call in the per-message paths below)."""
    global _api, _Passed
    if _api is None:
        from opentelemetry import trace  # deferred: OpenTelemetry only when tracing is on

        class Passed(trace.NonRecordingSpan):
            """A remote parent that was not sampled, passed on as it came: its
            ``traceparent`` and hex ids kept as read, for the hop's headers and log lines;
            its ``SpanContext`` built only if something asks for it (nothing on a hop)."""

            def __init__(self, traceparent: str, ids: tuple[str, str]) -> None:
                # (not NonRecordingSpan's __init__: its context is built when asked for)
                self.traceparent, self.ids = traceparent, ids

            def get_span_context(self) -> Any:
                trace_hex, span_hex = self.ids
                return trace.SpanContext(
                    int(trace_hex, 16), int(span_hex, 16), is_remote=True,
                    trace_flags=trace.TraceFlags(int(self.traceparent[-2:], 16)))

            def __repr__(self) -> str:
                return f"Passed({self.traceparent!r})"

        _api, _Passed = trace, Passed
    return _api


def disable() -> None:
    global enabled, _tracer, _follows_parent
    enabled, _tracer, _follows_parent = False, None, False


def detect() -> bool:
    """Turn tracing on when this process has set a tracer provider of its own."""
    if not enabled:
        module = sys.modules.get("opentelemetry.trace")
        if module is not None and getattr(module, "_TRACER_PROVIDER", None) is not None:
            enable()
    return enabled


def tracer() -> Tracer:
    assert _tracer is not None, "tracing is off: check tracing.enabled first"
    return _tracer


def attributes(source: Any) -> dict[str, Any]:
    """Span attributes from an event's (or a cost row's) fields: ids, model, cost."""
    # a model's fields are in its __dict__: getattr of one an event type lacks goes through
    # pydantic's __getattr__ and an AttributeError, which cost more than the span itself
    fields = getattr(source, "__dict__", None)
    get = fields.get if fields is not None else lambda name: getattr(source, name, None)
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = get(name)
        if value is not None:
            out[f"aipipe.{name}"] = value
    cost = get("cost_usd")
    if cost is not None:
        out["aipipe.cost_usd"] = float(cost)
    success = get("success")
    if success is not None:
        out["aipipe.success"] = bool(success)
    return out


def inject(headers: list[Any], as_bytes: bool = True, span: Span | None = None) -> None:
    """Append the W3C headers of ``span`` (or the current span) to ``headers``."""
    if span is None:
        span = current_span()
    if type(span) is _Passed:
        passed: str = cast(Any, span).traceparent
        headers.append((TRACEPARENT, passed.encode() if as_bytes else passed))
        return
    sc = span.get_span_context()
    if not sc.is_valid:
        return
    parent = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
    state = sc.trace_state.to_header() if sc.trace_state else ""
    headers.append((TRACEPARENT, parent.encode() if as_bytes else parent))
    if state:
        headers.append((TRACESTATE, state.encode() if as_bytes else state))


def carried(headers: Sequence[tuple[str, Any]] | Mapping[str, Any] | None) -> dict[str, str]:
    """The trace headers among ``headers`` (a Kafka message's list of pairs, or a mapping)."""
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in (TRACEPARENT, TRACESTATE) and value is not None:
            out[name] = value.decode(errors="replace") if isinstance(value, bytes) else value
    return out


def parent_of(headers: Sequence[tuple[str, Any]] | Mapping[str, Any] | None) -> Context | None:
    """The context in a message's trace headers (None: a new trace starts)."""
    found = carried(headers)
    return _extracted(found) if found else None


def _extracted(found: dict[str, str]) -> Context:
    global _propagator
    if _propagator is None:
        from opentelemetry.trace.propagation.tracecontext import (  # deferred: tracing on only
            TraceContextTextMapPropagator,
        )

        _propagator = TraceContextTextMapPropagator()
    context: Context = _propagator.extract(found)
    return context


def consumer_kind() -> SpanKind:
    kind: SpanKind = _trace().SpanKind.CONSUMER
    return kind


def start_consumer(name: str, headers: Any, source: Any, **extra: Any) -> Span:
    """A span for a stage that consumed a message: the child of the span in its headers.

    When that span was not sampled and the sampler follows the parent, it is the parent's
    own (non-recording) span: nothing is recorded either way, and the context the stage
    passes on is the one it received, at the cost of parsing a header."""
    found = carried(headers)
    if found and _follows_parent:
        passed = _unsampled(found)
        if passed is not None:
            return passed
    parent = _extracted(found) if found else None
    if parent is not None and _follows_parent:
        remote: Span = _trace().get_current_span(parent)
        context = remote.get_span_context()
        # (a traceparent the propagator refused is no parent: a new trace starts)
        if context.is_valid and not context.trace_flags.sampled:
            return remote
    span = tracer().start_span(name, context=parent, kind=consumer_kind())
    # the attributes only for a span the sampler kept (the standard samplers decide by the
    # trace id and the parent, not by attributes)
    if span.is_recording():
        span.set_attributes({**attributes(source), **extra})
    return span


def _unsampled(found: dict[str, str]) -> Span | None:
    """The parent's own span when ``found`` is a version-00 ``traceparent`` whose span was not
    sampled, without a ``tracestate``: what the W3C propagator would give, read without it.
    None for every other case, which the propagator reads."""
    match = _TRACEPARENT_00.fullmatch(found.get(TRACEPARENT, ""))
    if match is None or TRACESTATE in found:
        return None
    trace_hex, span_hex, flags_hex = match.groups()
    if int(flags_hex, 16) & 1 or trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
        return None
    _trace()
    span: Span = _Passed(found[TRACEPARENT], (trace_hex, span_hex))
    return span


def current_span() -> Span:
    """The current span: the unsampled parent a stage passes on, else OpenTelemetry's."""
    passing: Span | None = _passing.get()
    if passing is not None:
        return passing
    span: Span = _trace().get_current_span()
    return span


def current_context() -> Context | None:
    """The context a new span should be the child of: None for OpenTelemetry's current
    one, or that of the unsampled parent a stage passes on."""
    passing = _passing.get()
    return None if passing is None else _trace().set_span_in_context(passing)


def recording() -> bool:
    """Whether a child of the current span may be recorded (False: the sampler would drop
    it, so a stage skips building it)."""
    if _passing.get() is not None:  # an unsampled parent, and the sampler follows it
        return False
    sc = _trace().get_current_span().get_span_context()
    return not _follows_parent or not sc.is_valid or bool(sc.trace_flags.sampled)


@contextmanager
def _within(span: Span, end: bool) -> Iterator[None]:
    token = _passing.set(None)  # (within an unsampled parent passed on: this span is current)
    try:
        with _trace().use_span(span, end_on_exit=end):
            yield
    finally:
        _passing.reset(token)


class _Passing:
    """The block in which an unsampled parent is passed on: current for this module's
    readers (``inject``, ``current_ids``, ``recording``, ``current_context``); it records
    nothing and has nothing to end."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> None:
        self.token = _passing.set(self.span)

    def __exit__(self, *exc: object) -> None:
        _passing.reset(self.token)


def within(span: Span | None, end: bool = False) -> AbstractContextManager[None]:
    """``span`` as the current span in the block (ended after it when ``end``); a shared
    no-op block when ``span`` is None (tracing off)."""
    if span is None:
        return _NOTHING
    if type(span) is _Passed:
        return _Passing(span)
    return _within(span, end)


def note(source: Any) -> None:
    """Add the attributes of ``source`` (a completion: model, cost) to the current span
    (only when it records them: most hops of a sampled deployment do not)."""
    span = current_span()
    if span.is_recording():
        span.set_attributes(attributes(source))


def current_ids() -> tuple[str, str] | None:
    """The current span's trace and span id in hex, for log lines; None with no span."""
    span = current_span()
    if type(span) is _Passed:
        ids: tuple[str, str] = cast(Any, span).ids
        return ids
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    return f"{sc.trace_id:032x}", f"{sc.span_id:016x}"

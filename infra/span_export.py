"""Spans exported by a helper process, so that a worker's own threads only hand them over.

Encoding a span for OTLP costs about 60 µs of Python in the SDK's exporter; in a worker that
is one process under one GIL, the batch processor's thread took that time from the event
loop (a sixth of a traced worker's CPU at seven spans per operation). Here the worker keeps
the SDK's tracer and spans and swaps only the export side:

- ``HandOff``, a ``SpanProcessor`` in the worker: ``on_end`` appends a compact tuple of
  the ended span to a bounded queue (``OTEL_BSP_MAX_QUEUE_SIZE``, 2048; full: the span is
  dropped, as the SDK's batch processor drops it, and counted in
  ``aipipe_spans_dropped_total``); a thread writes the queue to the helper's stdin,
  ``marshal``-ed, when ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` (512) spans wait or every
  ``OTEL_BSP_SCHEDULE_DELAY`` ms (5000). A helper that ended is started again.
- the helper (``python -m aipipe.span_helper EXPORTERS ANSWERS_FD``, which runs
  ``serve``): rebuilds each span as the SDK's ``ReadableSpan`` and exports it with the
  SDK's own exporters (``otlp``: OTLP/HTTP reading its ``OTEL_EXPORTER_OTLP_*`` variables;
  ``console``), in batches of the same size. It inherits the worker's environment and ends
  when its stdin closes: when the worker shuts the processor down, or dies (the spans
  already handed over are still exported).

``force_flush`` (before a worker ends with ``os._exit``) waits until the helper has
exported everything handed over so far.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import marshal
import os
import queue
import select
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

import structlog
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from aipipe.infra.metrics import SPANS_DROPPED
from aipipe.infra.tracing import exporters_named

log = structlog.get_logger("aipipe.tracing")

_FRAME = struct.Struct(">cI")  # kind, payload length
_RESOURCE, _SPANS, _FLUSH = b"r", b"s", b"f"
# the helper's answer to a flush, on the answers pipe (its stdout is the worker's): the
# flush's number, so that a flush that timed out cannot have its late answer taken for the
# next one's
_FLUSHED = struct.Struct(">Q")
_PIPE_BYTES = 1 << 20  # the pipe to the helper: about 5,000 spans
_AHEAD = 8  # frames (of up to a batch each) the helper reads ahead of its export


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def _context(sc: SpanContext | None) -> tuple[Any, ...] | None:
    if sc is None:
        return None
    return (sc.trace_id, sc.span_id, int(sc.trace_flags), sc.is_remote,
            sc.trace_state.to_header() if sc.trace_state else "")


def _plain(attributes: Any) -> dict[str, Any]:
    """A plain dict of a span's attributes (the SDK's ``BoundedAttributes`` keeps one)."""
    if not attributes:
        return {}
    inner = getattr(attributes, "_dict", None)  # a copy at C speed; else item by item
    return dict(inner if isinstance(inner, dict) else attributes)


def compact(span: ReadableSpan) -> tuple[Any, ...]:
    """What the helper needs of an ended span, as values ``marshal`` takes."""
    scope = span.instrumentation_scope
    status = span.status
    events, links = span.events, span.links
    return (
        span.name, _context(span.context), _context(span.parent), span.kind.value,
        span.start_time, span.end_time, _plain(span.attributes),
        tuple((e.name, e.timestamp, _plain(e.attributes)) for e in events) if events else (),
        tuple((_context(k.context), _plain(k.attributes)) for k in links) if links else (),
        status.status_code.value, status.description,
        (scope.name, scope.version, scope.schema_url) if scope else None,
    )


def _span_context(values: tuple[Any, ...] | None) -> SpanContext | None:
    if values is None:
        return None
    trace_id, span_id, flags, remote, state = values
    return SpanContext(trace_id, span_id, remote, TraceFlags(flags),
                       TraceState.from_header([state]) if state else None)


def rebuilt(values: tuple[Any, ...], resource: Resource) -> ReadableSpan:
    """The ``ReadableSpan`` that ``compact`` described, for the SDK's exporters."""
    (name, context, parent, kind, start, end, attributes, events, links, status, description,
     scope) = values
    return ReadableSpan(
        name=name, context=_span_context(context), parent=_span_context(parent),
        resource=resource, attributes=attributes,
        events=[Event(n, a, timestamp=t) for n, t, a in events],
        links=[Link(_span_context(c), a) for c, a in links],  # type: ignore[arg-type]
        kind=SpanKind(kind), status=Status(StatusCode(status), description),
        start_time=start, end_time=end,
        instrumentation_scope=InstrumentationScope(*scope) if scope else None,
    )


class HandOff(SpanProcessor):
    """Hands ended spans to the helper process that exports them (module docstring).

    A helper that ended (killed, crashed) is started again when spans next go, at most once
    every ``RESTART_SECONDS``; the spans that could not go meanwhile are dropped and counted
    (``aipipe_spans_dropped_total``, as are those a full queue refused)."""

    RESTART_SECONDS = 10.0

    def __init__(self, resource: Resource, exporters: str, helper: Sequence[str]) -> None:
        """``helper``: the command that runs ``serve`` (``exporters`` and the answers' file
        descriptor are added to it)."""
        self.max_queue = _int_env("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self.batch = _int_env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.delay = _int_env("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self.dropped = 0
        self._resource = resource
        self._command = [*helper, exporters]
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one writer of the pipe at a time
        self._flushing = threading.Lock()  # one reader of the answers at a time
        self._flushes = 0
        self._closed = False
        with self._lock:
            self._start()
        self._thread = threading.Thread(target=self._run, name="span-handoff", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        """Start the helper and tell it the resource (under the lock)."""
        # the helper answers a flush on a pipe of its own: its stdout stays the worker's
        # (where the console exporter writes)
        self._answers, answers = os.pipe()
        self._helper = subprocess.Popen([*self._command, str(answers)],
                                        stdin=subprocess.PIPE, pass_fds=(answers,))
        os.close(answers)
        self._started = time.monotonic()
        assert self._helper.stdin is not None
        self._pipe: IO[bytes] = self._helper.stdin
        with contextlib.suppress(AttributeError, OSError):  # Linux: room for the spans of
            fcntl.fcntl(self._pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)  # its start-up
        self._write(_RESOURCE, marshal.dumps(
            (dict(self._resource.attributes), self._resource.schema_url)))

    def _write(self, kind: bytes, data: bytes) -> None:
        self._pipe.write(_FRAME.pack(kind, len(data)) + data)
        self._pipe.flush()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self._closed or not (span.context and span.context.trace_flags.sampled):
            return
        if len(self._queue) >= self.max_queue:
            self._drop("queue_full", 1)
            return
        self._queue.append(compact(span))
        if len(self._queue) >= self.batch:
            self._wake.set()

    def _drop(self, reason: str, spans: int) -> None:
        self.dropped += spans
        SPANS_DROPPED.labels(reason).inc(spans)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.delay)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        while self._queue:
            spans = [self._queue.popleft() for _ in range(min(len(self._queue), self.batch))]
            self._send(_SPANS, spans, len(spans))

    def _send(self, kind: bytes, payload: Any, spans: int = 0) -> bool:
        data = marshal.dumps(payload)
        with self._lock:
            try:
                if self._helper.poll() is not None:
                    self._restart()
                self._write(kind, data)
                return True
            except (BrokenPipeError, ValueError, OSError) as exc:
                log.warning("span_export_helper_gone", exit_code=self._helper.poll(),
                            error=f"{type(exc).__name__}: {exc}", spans_dropped=spans)
                self._drop("helper_gone", spans)
                return False

    def _restart(self) -> None:
        """Start a new helper for the one that ended, unless it is too soon (raises)."""
        if self._closed or time.monotonic() - self._started < self.RESTART_SECONDS:
            raise BrokenPipeError("the span export helper ended")
        log.warning("span_export_helper_restarted", exit_code=self._helper.returncode)
        with contextlib.suppress(OSError):
            self._pipe.close()
        with contextlib.suppress(OSError):
            os.close(self._answers)
        self._start()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Hand over what is queued and wait until the helper has exported it."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._flushing:
            self._drain()
            self._flushes += 1
            number = self._flushes
            if not self._send(_FLUSH, number):
                return False
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self._answers], [], [], left)
                if not ready:
                    break
                answer = os.read(self._answers, _FLUSHED.size)  # one write each: whole
                if len(answer) < _FLUSHED.size:
                    return False  # the helper ended
                if _FLUSHED.unpack(answer)[0] == number:
                    return True
                # the late answer of an earlier flush that timed out: wait on
            return False

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        self._drain()
        with self._lock, contextlib.suppress(OSError):
            self._pipe.close()
        try:
            self._helper.wait(timeout)
        except subprocess.TimeoutExpired:
            self._helper.kill()
        os.close(self._answers)


def _frames(stream: IO[bytes]) -> Iterator[tuple[bytes, Any]]:
    while True:
        head = stream.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        kind, size = _FRAME.unpack(head)
        data = stream.read(size)
        if len(data) < size:
            return
        yield kind, marshal.loads(data)


def _export(exporters: Sequence[SpanExporter], spans: list[ReadableSpan]) -> None:
    for exporter in exporters:
        try:
            exporter.export(spans)
        except Exception:  # an exporter's failure loses its batch, not the helper
            log.exception("span_export_failed")


def _read(stream: IO[bytes], frames: queue.Queue[tuple[bytes, Any] | None]) -> None:
    for frame in _frames(stream):
        frames.put(frame)
    frames.put(None)


def serve(exporter_names: str, answers_fd: int, stream: IO[bytes]) -> None:
    """The helper's work: read frames from ``stream`` until it closes, export their spans,
    answer each flush on ``answers_fd``.

    A thread reads the pipe while this one exports, so the worker's writes do not wait
    for an export; up to ``_AHEAD`` frames wait here (then the pipe, then the worker's
    queue fill, and the worker drops spans)."""
    exporters = exporters_named(exporter_names)
    resource = Resource.get_empty()
    answers = os.fdopen(answers_fd, "wb", buffering=0)
    frames: queue.Queue[tuple[bytes, Any] | None] = queue.Queue(_AHEAD)
    threading.Thread(target=_read, args=(stream, frames), daemon=True).start()
    while (frame := frames.get()) is not None:
        kind, payload = frame
        if kind == _RESOURCE:
            attributes, schema_url = payload
            resource = Resource(attributes, schema_url)
        elif kind == _SPANS:
            _export(exporters, [rebuilt(values, resource) for values in payload])
        elif kind == _FLUSH:
            answers.write(_FLUSHED.pack(payload))
    for exporter in exporters:
        exporter.shutdown()

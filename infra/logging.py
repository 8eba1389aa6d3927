"""structlog configured once per process: console on a terminal in development, JSON otherwise.

Context (``request_id``, ``client_id``, ``event_id``) is bound per event through
contextvars; with tracing on, every line logged while a span is current carries its
``trace_id`` and ``span_id``; a processor drops secrets and prompt text before anything is
rendered.
Sentry is initialised here when ``SENTRY_DSN`` is set.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

from aipipe.infra.settings import Settings
from aipipe.infra.tracing import flush_traces
from aipipe.producers import tracing

_SECRET_KEYS = frozenset({"api_key", "authorization", "password", "prompt", "token", "key"})


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask values whose key names a secret or a prompt; never log them."""
    for name in list(event_dict):
        if name.lower() in _SECRET_KEYS:
            event_dict[name] = "[redacted]"
    return event_dict


def add_trace_ids(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``trace_id`` and ``span_id`` of the current span (tracing on, a span current)."""
    if tracing.enabled:
        ids = tracing.current_ids()
        if ids is not None:
            event_dict["trace_id"], event_dict["span_id"] = ids
    return event_dict


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper())
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(message)s")
    pretty = settings.env == "development" and sys.stderr.isatty()
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if pretty else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    if settings.sentry_dsn is not None:
        import sentry_sdk

        sentry_sdk.init(
            dsn=settings.sentry_dsn.get_secret_value(),
            environment=settings.env,
            send_default_pii=False,
            # frame locals would carry SDK request objects, API keys and bearer tokens in
            # their headers (seen with google-genai); tests/e2e/test_generation.py checks
            include_local_variables=False,
        )


@contextmanager
def bound_event(**fields: Any) -> Iterator[None]:
    """Bind event context (request_id, client_id, event_id, ...) for the logs in the block."""
    with structlog.contextvars.bound_contextvars(**fields):
        yield


def report_exception(exc: BaseException, **tags: str) -> None:
    """Send ``exc`` to Sentry (a no-op unless SENTRY_DSN is set) tagged with the event's ids."""
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        for name, value in tags.items():
            scope.set_tag(name, value)
        sentry_sdk.capture_exception(exc)


#: The exit status of a worker that stopped itself because a part of it failed for good.
EXIT_PART_FAILED = 70


def exit_process(part: str, exc: BaseException, code: int = EXIT_PART_FAILED) -> None:
    """Take the whole process down after ``part`` failed: a log line, Sentry, exit ``code``.

    For a part that cannot go on and must not be restarted alone (a faust task whose
    events are not yet acknowledged, a sink thread): ``os._exit`` skips every cleanup
    that could commit offsets or acknowledge events, so a supervisor's restart repeats
    the unfinished work instead of losing it.
    """
    structlog.get_logger("aipipe").critical(
        "worker_part_failed", part=part, error=f"{type(exc).__name__}: {exc}",
        exit_code=code, exc_info=exc,
    )
    try:
        import sentry_sdk

        report_exception(exc, part=part)
        sentry_sdk.flush(timeout=2.0)
        flush_traces(timeout=2.0)
    finally:
        sys.stderr.flush()
        os._exit(code)

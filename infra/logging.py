"""structlog configured once per process: console on a terminal in development, JSON otherwise.

The standard library's loggers go through the same renderer, so in production every line a
worker writes is one JSON object: faust's and mode's (``stdlib_logging_config`` is also the
faust Worker's ``logging_config``), aiokafka's, librdkafka's (the confluent-kafka clients
log through ``aipipe.producers.producer.LIBRDKAFKA_LOGGER``), Python warnings, and uncaught
exceptions in any thread; a traceback is the ``exception`` field of its line, never loose text.

Context (``request_id``, ``client_id``, ``event_id``) is bound per event through
contextvars; with tracing on, every line logged while a span is current carries its
``trace_id`` and ``span_id``; a processor drops secrets and prompt text before anything is
rendered.
Sentry is initialised here when ``SENTRY_DSN`` is set.
"""

from __future__ import annotations

import logging
import logging.config
import os
import sys
import threading
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


def _pretty(settings: Settings) -> bool:
    return settings.env == "development" and sys.stderr.isatty()


def _renderer(settings: Settings) -> Any:
    if _pretty(settings):
        return structlog.dev.ConsoleRenderer()
    return structlog.processors.JSONRenderer()


def renders_json(settings: Settings) -> bool:
    """Whether this process's lines are JSON: in production, or when stderr is no terminal."""
    return not _pretty(settings)


def stdlib_logging_config(settings: Settings) -> dict[str, Any]:
    """``logging.config.dictConfig`` of the standard library's loggers: one handler on the
    root logger, rendering each record as structlog renders its own lines (``logger`` is
    the record's logger name). Their level is WARNING, or DEBUG when ``AIPIPE_LOG_LEVEL``
    is debug: the libraries' info lines are noise.

    faust's Worker takes it as ``logging_config``: mode's ``setup_logging`` replaces the
    root handlers at worker start with what this says, not with its coloured text handler.
    """
    level = getattr(logging, settings.log_level.upper())
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structlog": {
            "()": structlog.stdlib.ProcessorFormatter,
            "foreign_pre_chain": [
                structlog.contextvars.merge_contextvars,
                add_trace_ids,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                redact,
            ],
            "processors": [
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _renderer(settings),
            ],
        }},
        # the stream now: mode later swaps sys.stderr for a proxy that logs what is written
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": sys.stderr,
                                "formatter": "structlog"}},
        "root": {"level": logging.DEBUG if level <= logging.DEBUG else max(level, logging.WARNING),
                 "handlers": ["stderr"]},
    }


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    structlog.get_logger("aipipe").critical(
        "uncaught_exception", error=f"{kind.__name__}: {exc}", exc_info=(kind, exc, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # as the default hook: a thread that exits on purpose
    structlog.get_logger("aipipe").error(
        "thread_exception", thread=args.thread.name if args.thread else None,
        error=f"{args.exc_type.__name__}: {args.exc_value}",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_unraisable(args: Any) -> None:  # sys.UnraisableHookArgs
    structlog.get_logger("aipipe").warning(
        "unraisable_exception", message=args.err_msg or "Exception ignored in",
        object=repr(args.object), exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper())
    logging.config.dictConfig(stdlib_logging_config(settings))
    pretty = _pretty(settings)
    renderer = _renderer(settings)
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
        # one write per line (print() makes two: the line, then its newline), so a line that
        # another thread logs through the stdlib handler cannot land between them
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    if not pretty:  # the interpreter's own tracebacks, as JSON lines too
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_exception
        sys.unraisablehook = _log_unraisable
    logging.captureWarnings(True)  # warnings.warn -> logger py.warnings -> the root handler
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

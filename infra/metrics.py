"""A worker's Prometheus metrics and health, served on one port (``AIPIPE_METRICS_PORT``).

``/metrics`` is Prometheus's text format; ``/healthz`` says whether every part of the
process (agent, intake task, timer, sink thread) made progress or is idle, within
``AIPIPE_HEALTH_STALL_SECONDS``; ``/readyz`` whether the process can do its work
(partitions assigned, tables recovered, store reachable). Both answer 200 or 503 with a
JSON body naming each part.

Worker code only: the emitter's path (``aipipe.producers``, ``aipipe.schemas``) never
imports this. Metric names follow Prometheus's conventions (``aipipe_`` prefix, units in the
name, ``_total`` on counters); labels take bounded values only (stage, provider, model,
reason, topic, partition), never a client or request id.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
import structlog
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app

from aipipe.infra.settings import ConfigError, Settings

log = structlog.get_logger("aipipe.metrics")

# -- the metrics ----------------------------------------------------------------------------

EVENTS_CONSUMED = Counter(
    "aipipe_events_consumed_total", "Events a stage took from Kafka.", ["stage"])
EVENTS_PRODUCED = Counter(
    "aipipe_events_produced_total", "Events a stage sent to Kafka, by event type.",
    ["stage", "event_type"])
DECISIONS = Counter(
    "aipipe_admission_decisions_total",
    "Admission decisions; reason is 'admitted' for an admission, backend the rate limiter "
    "that decided (redis, memory, none).", ["decision", "reason", "backend"])
BUDGET_THRESHOLDS = Counter(
    "aipipe_budget_thresholds_crossed_total", "Budget thresholds clients' spend crossed.",
    ["threshold_percent"])
PROVIDER_CALLS = Counter(
    "aipipe_provider_calls_total",
    "Provider call attempts; outcome is ok, retryable, permanent or circuit_open.",
    ["provider", "model", "outcome"])
PROVIDER_ERRORS = Counter(
    "aipipe_provider_errors_total", "Provider call attempts that failed, by HTTP status class.",
    ["provider", "model", "status"])
PROVIDER_LATENCY = Histogram(
    "aipipe_provider_call_duration_seconds", "Duration of one provider call attempt.",
    ["provider", "model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
CIRCUIT_STATE = Gauge(
    "aipipe_circuit_state", "Circuit breaker per provider and model: 0 closed, 1 half open, "
    "2 open.", ["provider", "model"])
OPERATIONS_IN_FLIGHT = Gauge(
    "aipipe_operations_in_flight", "Admitted operations this worker is running now.")
OPERATIONS_COMPLETED = Counter(
    "aipipe_operations_completed_total", "operation.completed events sent, by outcome.",
    ["operation_type", "success"])
VIDEO_POLLS_PENDING = Gauge(
    "aipipe_video_polls_pending", "Videos waiting for their next poll on this worker.")
DEDUP_KEYS = Gauge(
    "aipipe_dedup_keys", "Keys a streams dedup table holds in this worker's memory, after "
    "the last purge.", ["table"])
DEDUP_EXPIRED = Counter(
    "aipipe_dedup_keys_expired_total",
    "Dedup keys dropped from memory by the purge, older than AIPIPE_DEDUP_HORIZON_HOURS.",
    ["table"])
SINK_BATCHES = Counter(
    "aipipe_sink_batches_total", "Batches a sink wrote and committed.", ["stage"])
SINK_ROWS = Counter("aipipe_sink_rows_total", "Rows a sink wrote.", ["stage"])
SINK_BATCH_SECONDS = Histogram(
    "aipipe_sink_batch_duration_seconds", "Writing and committing one batch, retries included.",
    ["stage"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
SINK_RETRIES = Counter(
    "aipipe_sink_write_retries_total", "Writes retried after a transient store failure.",
    ["stage"])
DEAD_LETTERS = Counter(
    "aipipe_dead_letters_total", "Messages sent to the dead-letter topic.", ["stage"])
WEBHOOK_DELIVERIES = Counter(
    "aipipe_webhook_deliveries_total", "Webhook deliveries by how a pass ended: delivered, "
    "retried (handed to the retry topic), deferred (a slow receiver's first try, handed to "
    "the retry topic untried) or dead_lettered (the last try, or a final answer).",
    ["outcome"])
SPANS_DROPPED = Counter(
    "aipipe_spans_dropped_total", "Ended spans a traced worker dropped before their export: "
    "its queue was full (queue_full) or its span export helper had ended (helper_gone).",
    ["reason"])
CONSUMER_LAG = Gauge(
    "aipipe_consumer_lag_messages",
    "Messages between a partition's high watermark and this consumer's position.",
    ["group", "topic", "partition"])
USAGE_PROBLEMS = Counter(
    "aipipe_usage_problems_total", "Successful operations whose usage the provider left out "
    "(problem=missing: they cost 0) or gave past any plausible bound (implausible: priced as "
    "given), per provider and model.", ["provider", "model", "problem"])
COST_USD = Counter(
    "aipipe_cost_usd_total", "Cost of the operations completed, in US dollars (failed ones "
    "cost 0), per provider and model; the model has a price, so the label set is the price "
    "table's.", ["provider", "model"])

CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class LagGauge:
    """``aipipe_consumer_lag_messages`` for one consumer group's current assignment: the
    partitions it no longer holds are removed, so no other worker's partition is reported
    twice."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.shown: set[tuple[str, int]] = set()
        self.measured_at = 0.0  # time.monotonic() of the last update, for its caller

    def update(self, lags: dict[tuple[str, int], int]) -> None:
        for topic, partition in self.shown - lags.keys():
            CONSUMER_LAG.remove(self.group, topic, str(partition))
        for (topic, partition), lag in lags.items():
            CONSUMER_LAG.labels(self.group, topic, str(partition)).set(max(0, lag))
        self.shown = set(lags)
        self.measured_at = time.monotonic()


# -- health -----------------------------------------------------------------------------------


@dataclass
class _Part:
    since: float  # when it last made progress or began to wait
    idle: bool
    dead: bool = False


class Health:
    """Heartbeats of a process's parts and the facts its readiness rests on.

    A part calls ``beat`` when it makes progress and ``idle`` when it starts waiting for
    input (or ``working`` around a piece of work). It is stalled when it has been busy
    without progress for longer than the limit; an idle part never is. A part that
    stops beating (a dead thread, a blocked event loop) is stalled the same way.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._parts: dict[str, _Part] = {}
        self._facts: dict[str, Callable[[], bool]] = {}
        self._lock = threading.Lock()

    def beat(self, part: str) -> None:
        self._parts[part] = _Part(self.clock(), idle=False)

    def idle(self, part: str) -> None:
        self._parts[part] = _Part(self.clock(), idle=True)

    def died(self, part: str) -> None:
        """``part`` ended while the process runs (a supervised thread): failing at once."""
        self._parts[part] = _Part(self.clock(), idle=False, dead=True)

    def forget(self, part: str) -> None:
        """``part`` stopped on purpose (the process is stopping)."""
        self._parts.pop(part, None)

    @contextmanager
    def working(self, part: str) -> Iterator[None]:
        self.beat(part)
        try:
            yield
        finally:
            self.idle(part)

    def ready_when(self, name: str, check: Callable[[], bool]) -> None:
        """``/readyz`` asks ``check`` (cheap, from another thread); a raise counts as False."""
        with self._lock:
            self._facts[name] = check

    def set_ready(self, name: str, ready: bool) -> None:
        self.ready_when(name, lambda: ready)

    def alive(self, stall_seconds: float) -> tuple[bool, dict[str, Any]]:
        now = self.clock()
        parts: dict[str, Any] = {}
        for name, part in sorted(self._parts.copy().items()):
            age = round(now - part.since, 3)
            stalled = not part.idle and age > stall_seconds
            state = "dead" if part.dead else "stalled" if stalled else \
                "idle" if part.idle else "ok"
            parts[name] = {"state": state, "seconds": age}
        late = [n for n, p in parts.items() if p["state"] in ("stalled", "dead")]
        return not late, {"status": "stalled" if late else "ok", "stalled": late,
                             "stall_seconds": stall_seconds, "parts": parts}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            facts = dict(self._facts)
        checks: dict[str, bool] = {}
        for name, check in sorted(facts.items()):
            try:
                checks[name] = bool(check())
            except Exception:
                checks[name] = False
        not_ready = [n for n, ok in checks.items() if not ok]
        return bool(checks) and not not_ready, {
            "status": "ready" if checks and not not_ready else "not_ready",
            "not_ready": not_ready if checks else ["nothing registered yet"], "checks": checks}


#: the process's parts; a worker has one of each part, so one registry per process
HEALTH = Health()


# -- the server -------------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None  # scrapes every second are no news


def health_app(health: Health, stall_seconds: float) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, body = health.alive(stall_seconds) if path == "/healthz" else health.ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [orjson.dumps(body)]
        if path == "/metrics" or path == "/":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"/metrics, /healthz or /readyz\n"]

    return app


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` in a daemon thread."""

    def __init__(self, port: int, stall_seconds: float, host: str = "0.0.0.0",
                 health: Health = HEALTH) -> None:
        self.server = make_server(host, port, health_app(health, stall_seconds),
                                  server_class=_Server, handler_class=_Quiet)
        self.port = int(self.server.server_port)
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http",
                                       daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(settings: Settings) -> MetricsServer | None:
    """Start the endpoint of ``aipipe run`` (None when ``AIPIPE_METRICS_PORT`` is 0)."""
    if not settings.metrics_port:
        return None
    try:
        server = MetricsServer(settings.metrics_port, settings.health_stall_seconds,
                               host=settings.metrics_host)
    except OSError as exc:
        raise ConfigError(
            f"AIPIPE_METRICS_PORT={settings.metrics_port} cannot be served on "
            f"{settings.metrics_host} ({exc.strerror}); give each worker process its own "
            "free port, or 0 to turn the endpoint off."
        ) from exc
    log.info("metrics_endpoint_started", port=server.port, host=settings.metrics_host)
    return server.start()

"""The batching sink: the one Kafka consumer loop behind every ClickHouse projection.

Order per batch (at-least-once, made exact by idempotent writes):
  1. poll messages until the batch is full or old enough; a message the projection cannot
     turn into rows (any exception, not only ``EventDecodeError``) goes to the dead-letter
     topic with the reason, and the batch goes on;
  2. write the batch's rows with a deterministic deduplication token: the batch's offset
     ranges and a digest of its messages (``message_digest``), so the same messages
     always give the same token and a topic deleted and created again under its name,
     whose offsets start at 0 again, never repeats an old batch's token with new messages.
     A failed write is classified (``classify``):
       - transient (store unreachable, timeouts, overload): the same rows with the same
         token again after a capped exponential backoff, for as long as it takes; the
         partitions are paused and the consumer keeps polling, so it stays in its group;
       - rejected (these rows cannot be written): the batch is halved, each half with a
         token made of its own offsets, until the messages ClickHouse refuses stand alone;
         they go to the dead-letter topic with ClickHouse's sentence, the rest is written;
       - fatal (the engine or the client is unusable): ``SinkFatalError`` ends the thread,
         and its supervisor (``aipipe.infra.supervise``) the process;
  3. wait until the dead-letter topic has acknowledged every dead letter;
  4. commit the offsets, only now.
A crash anywhere repeats at most the batch. A projection says how a message becomes rows
(``rows``) and how rows are written (``write``).

With tracing on, each message with rows gets a span (``sink <stage>``), the child of the
span in its headers, from its arrival until its batch is committed; its attributes come
from its first row (for costs: request and client id, model, cost).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

import structlog
from clickhouse_connect.driver.exceptions import Error as ClickHouseDriverError
from clickhouse_connect.driver.exceptions import OperationalError
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from aipipe.infra import metrics
from aipipe.infra.metrics import HEALTH, LagGauge
from aipipe.producers import tracing
from aipipe.producers.messages import readable
from aipipe.producers.producer import LIBRDKAFKA_LOGGER, EventProducer
from aipipe.schemas.deadletter import build_dead_letter
from aipipe.schemas.errors import AipipeError, EventDecodeError

log = structlog.get_logger("aipipe.sink")
Row = TypeVar("Row")
T = TypeVar("T")


#: consumer errors that no retry fixes: the process goes down and says why
_CONSUMER_FATAL = frozenset({
    KafkaError.INVALID_SESSION_TIMEOUT, KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._AUTHENTICATION,
})


class SinkFatalError(AipipeError):
    """The store cannot be used any more (the engine aborted, the client is closed, the
    table or the credentials are gone): the process must go down and be restarted."""


class InjectedFault(RuntimeError):
    """An unexpected error raised on purpose by ``FaultPoints`` (``sink_raise``)."""


def message_digest(message: Message) -> bytes:
    """A digest of everything a message's rows can be made of (key, value, headers,
    timestamp): two messages with the same coordinates and the same digest make the same
    rows, so deduplicating one against the other loses nothing."""
    headers = message.headers() or []
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    kind, stamp = message.timestamp()
    fields: list[str | bytes | None] = [message.key(), message.value(), f"{kind}:{stamp}"]
    for name, value in pairs:
        fields += [name, value]
    # each field length-prefixed (a missing one as one 0xff byte), hashed in one call
    parts: list[bytes] = []
    for field_ in fields:
        if field_ is None:
            parts.append(b"\xff")
        else:
            data = field_.encode() if isinstance(field_, str) else field_
            parts += (len(data).to_bytes(8, "big"), data)
    return hashlib.blake2b(b"".join(parts), digest_size=16).digest()


def content_digest(digests: Iterable[tuple[tuple[str, int, int], bytes]]) -> str:
    """One digest of messages' digests, in coordinate order: the part of a token that
    tells the messages of one incarnation of a topic from another's at the same offsets."""
    ordered = b"".join(digest for _, digest in sorted(digests))
    return hashlib.blake2b(ordered, digest_size=16).hexdigest()


def end_spans(spans: list[Any], error: str | None = None) -> None:
    """End the spans of a batch's messages: written and committed, or given up (``error``)."""
    if not spans:
        return
    from opentelemetry.trace import StatusCode  # deferred: OpenTelemetry only when tracing is on

    for span in spans:
        if error is not None:
            span.set_status(StatusCode.ERROR, error)
        span.end()


def coordinates(message: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed (not an error) message."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


# -- batches -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry(Generic[Row]):
    """One message of a batch and the rows it became."""

    topic: str
    partition: int
    offset: int
    message: Any  # the confluent_kafka Message, kept to dead-letter it at write time
    rows: list[Row]
    digest: bytes = b""  # message_digest(message)


@dataclass
class Batch:
    """What one flush writes: messages and their rows, dead letters, the offsets to commit."""

    entries: list[Entry[Any]] = field(default_factory=list)
    dead: int = 0
    first: dict[tuple[str, int], int] = field(default_factory=dict)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    digests: dict[tuple[str, int, int], bytes] = field(default_factory=dict)
    started: float = 0.0
    spans: list[Any] = field(default_factory=list)  # tracing on: a span per entry

    def __len__(self) -> int:
        return len(self.entries) + self.dead

    @property
    def rows(self) -> list[Any]:
        return [row for entry in self.entries for row in entry.rows]

    def track(self, topic: str, partition: int, offset: int, now: float,
              digest: bytes = b"") -> None:
        if not self.next_offsets:
            self.started = now
        self.first.setdefault((topic, partition), offset)
        self.next_offsets[(topic, partition)] = offset + 1
        self.digests[(topic, partition, offset)] = digest

    def dedup_token(self) -> str:
        """The same messages always give the same token, whichever process retries them:
        ``t:0:3-4;t:1:7-9#<digest of the messages>``."""
        ranges = ";".join(
            f"{t}:{p}:{self.first[(t, p)]}-{n - 1}"
            for (t, p), n in sorted(self.next_offsets.items())
        )
        return f"{ranges}#{content_digest(self.digests.items())}"

    def due(self, max_rows: int, max_seconds: float, now: float) -> bool:
        return bool(self.next_offsets) and (
            len(self) >= max_rows or now - self.started >= max_seconds
        )


def ranges_token(messages: Iterable[tuple[str, int, int, bytes]]) -> str:
    """The deduplication token of a part of a batch, from its messages' coordinates and
    digests: per partition, its runs of offsets, then the digest of the messages.

    ``t:0:3-4,7-7;t:1:9-9#<digest>``. It depends only on which messages are in the part,
    so a part split off the same batch after a crash gets the same token, and ClickHouse
    drops the repeated insert; a run of a whole batch reads like ``Batch.dedup_token``.
    """
    by_partition: dict[tuple[str, int], list[int]] = {}
    digests: dict[tuple[str, int, int], bytes] = {}
    for topic, partition, offset, digest in messages:
        by_partition.setdefault((topic, partition), []).append(offset)
        digests[(topic, partition, offset)] = digest
    parts = []
    for (topic, partition), offsets in sorted(by_partition.items()):
        runs: list[list[int]] = []
        for offset in sorted(set(offsets)):
            if runs and offset == runs[-1][1] + 1:
                runs[-1][1] = offset
            else:
                runs.append([offset, offset])
        parts.append(f"{topic}:{partition}:" + ",".join(f"{a}-{b}" for a, b in runs))
    return f"{';'.join(parts)}#{content_digest(digests.items())}"


def halves(items: Sequence[T]) -> tuple[Sequence[T], Sequence[T]]:
    """``items`` split in two, the first half the shorter one when the count is odd."""
    middle = len(items) // 2
    return items[:middle], items[middle:]


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """The wait before retry ``attempt`` (1, 2, ...): ``base``, doubling, at most ``cap``."""
    return min(cap, base * 2.0 ** min(max(attempt, 1) - 1, 62))


# -- what a failed write means -----------------------------------------------------------


class FailureKind(Enum):
    TRANSIENT = "transient"  # retry the same rows with the same token
    REJECTED = "rejected"  # these rows cannot be written: split, dead-letter the culprits
    FATAL = "fatal"  # the store is unusable: bring the process down


@dataclass(frozen=True)
class WriteFailure:
    kind: FailureKind
    reason: str  # one sentence, the store's own when it gave one
    error: str  # the class name of the error that says most


# ClickHouse error codes (src/Common/ErrorCodes.cpp) that say "not now", not "never":
# UNEXPECTED_END_OF_FILE, ATTEMPT_TO_READ_AFTER_EOF, TIMEOUT_EXCEEDED, TOO_SLOW,
# TOO_MANY_SIMULTANEOUS_QUERIES, NO_FREE_CONNECTION, SOCKET_TIMEOUT, NETWORK_ERROR, ABORTED
# (the fatal-shutdown sentence is matched first), MEMORY_LIMIT_EXCEEDED, TABLE_IS_READ_ONLY,
# NOT_ENOUGH_SPACE (retried until an operator frees disk, never dead-lettered), TOO_MANY_PARTS
# (but "Too many partitions for single INSERT block" is the data's), ALL_CONNECTION_TRIES_FAILED,
# TOO_FEW_LIVE_REPLICAS, UNKNOWN_STATUS_OF_INSERT, QUERY_WAS_CANCELLED, CANNOT_SCHEDULE_TASK,
# KEEPER_EXCEPTION, POCO_EXCEPTION.
TRANSIENT_CODES = frozenset({3, 32, 159, 160, 202, 203, 209, 210, 236, 241, 242, 243, 252, 279,
                             285, 319, 394, 439, 999, 1000})
# Codes no row of any batch gets past: the schema, the database or the credentials are not
# what the sink started with. A restart runs the migrations and re-reads the settings;
# retrying would stall and splitting would dead-letter everything. NO_SUCH_COLUMN_IN_TABLE,
# NUMBER_OF_COLUMNS_DOESNT_MATCH, UNKNOWN_IDENTIFIER, UNKNOWN_TABLE, SYNTAX_ERROR,
# UNKNOWN_DATABASE, UNKNOWN_SETTING, READONLY, UNKNOWN_USER, WRONG_PASSWORD, REQUIRED_PASSWORD,
# TABLE_IS_DROPPED, ACCESS_DENIED, AUTHENTICATION_FAILED.
BROKEN_CODES = frozenset({16, 20, 47, 60, 62, 81, 115, 164, 192, 193, 194, 218, 497, 516})
FATAL_SENTENCES = (
    "shutting down due to a fatal error",  # chDB after its engine aborted
    "The client has been closed",
    "Unable to open the chdb engine",
)
_TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
                               errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                               errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN})
_CODE = re.compile(r"\bCode:\s*(\d+)")
_HTTP_UNAVAILABLE = re.compile(r"HTTP status (502|503|504)\b")
_EXCEPTION_PREFIX = re.compile(r"^.*?(?:Code:\s*\d+\.\s*)?(?:DB::Exception:\s*)", re.S)
_TRAILER = re.compile(r"\s*(\([A-Z][A-Z0-9_]+\))?\s*(\(version [^)]*\)\s*)?$")


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was raised from, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _code(exc: BaseException) -> int | None:
    if isinstance(exc, ClickHouseDriverError) and isinstance(exc.code, int):
        return exc.code
    if isinstance(exc, (ClickHouseDriverError, RuntimeError)) or "DB::Exception" in str(exc):
        found = _CODE.search(str(exc))
        return int(found.group(1)) if found else None
    return None


def store_sentence(exc: BaseException) -> str:
    """The store's own words for the innermost error that has some, as one sentence."""
    chain = causes(exc)
    said: BaseException | None = next(
        (e for e in reversed(chain) if isinstance(e, ClickHouseDriverError)), None)
    said = said or next((e for e in reversed(chain) if str(e)), exc)
    text = " ".join(str(said).split()) or type(said).__name__
    text = _EXCEPTION_PREFIX.sub("", text, count=1) if "DB::Exception" in text else text
    text = _TRAILER.sub("", text)
    end = text.find(". ")
    text = text[: end + 1] if 0 <= end < 300 else text[:300]
    return text.rstrip(". ") + "."


def classify(exc: BaseException) -> WriteFailure:
    """What a failed write means, from the error and the errors it was raised from."""
    chain = causes(exc)
    sentence = store_sentence(exc)
    named = next((e for e in reversed(chain) if isinstance(e, ClickHouseDriverError)), chain[-1])
    error = type(named).__name__

    def failure(kind: FailureKind) -> WriteFailure:
        return WriteFailure(kind, sentence, error)

    if any(isinstance(e, MemoryError) for e in chain) or any(
        marker in str(e) for e in chain for marker in FATAL_SENTENCES
    ):
        return failure(FailureKind.FATAL)
    for e in chain:
        code = _code(e)
        if code in BROKEN_CODES:
            return failure(FailureKind.FATAL)
        if code == 252 and "partitions for single INSERT" in str(e):
            return failure(FailureKind.REJECTED)
        if code in TRANSIENT_CODES:
            return failure(FailureKind.TRANSIENT)
        if code is not None:
            return failure(FailureKind.REJECTED)
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError, OperationalError)):
            return failure(FailureKind.TRANSIENT)
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return failure(FailureKind.TRANSIENT)
        if _HTTP_UNAVAILABLE.search(str(e)):
            return failure(FailureKind.TRANSIENT)
    return failure(FailureKind.REJECTED)


def unreadable_reason(stage: str, exc: BaseException) -> str:
    """The dead-letter reason for a message that ``rows`` failed on (not a decode error)."""
    detail = " ".join(str(exc).split())[:200] or "no detail"
    return (
        f"The {stage} sink could not turn this message into rows ({type(exc).__name__}: "
        f"{detail}); fix the event and send it again."
    )


def rejected_reason(failure: WriteFailure) -> str:
    """The dead-letter reason for a message whose rows the store refused on their own."""
    return (
        f"ClickHouse refused this message's rows ({failure.reason.rstrip('.')}); "
        "fix the event and send it again."
    )


# -- fault injection ---------------------------------------------------------------------


class FaultPoints:
    """Make this process fail at a named point, for fault tests (``AIPIPE_FAULT``).

    ``before_insert@N`` / ``after_insert@N``: SIGKILL just before the N-th write of rows,
    or just after it and before the offsets are committed.
    ``sink_raise@N``: the N-th flush raises ``InjectedFault``, an unexpected error that
    ends the sink thread (its supervisor takes the process down).
    ``store_unavailable@N:SECONDS``: from the N-th write on, for SECONDS, every write fails
    with the error clickhouse-connect raises for a refused connection (``OperationalError``
    from ``ConnectionRefusedError``). The N-th write reaches the store first, as when the
    acknowledgement of an insert is lost, so its retry must be deduplicated by its token.
    """

    def __init__(self, spec: str, clock: Callable[[], float] = time.monotonic) -> None:
        point, _, rest = spec.partition("@")
        nth, _, seconds = rest.partition(":")
        self.point, self.nth, self.seconds = point, int(nth or 1), float(seconds or 0)
        self.seen = 0
        self.clock = clock
        self.unavailable_until: float | None = None

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.seen += 1
        if self.seen != self.nth:
            return
        log.warning("fault_injected", point=point, nth=self.nth)
        if point == "sink_raise":
            raise InjectedFault(f"Fault injected at {point}@{self.nth}.")
        os.kill(os.getpid(), signal.SIGKILL)

    def write(self, write: Callable[[], None]) -> None:
        """Call ``write`` unless ``store_unavailable`` has the store unreachable now."""
        if self.point != "store_unavailable":
            write()
            return
        self.seen += 1
        now = self.clock()
        if self.seen == self.nth:
            self.unavailable_until = now + self.seconds
            log.warning("fault_injected", point=self.point, nth=self.nth, seconds=self.seconds)
            write()
            raise self._refused()
        if self.unavailable_until is not None and now < self.unavailable_until:
            raise self._refused()
        write()

    @staticmethod
    def _refused() -> OperationalError:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        except ConnectionRefusedError as cause:
            error = OperationalError(
                "Error HTTPConnectionPool: Max retries exceeded (Connection refused) "
                "executing HTTP request (fault injected: store_unavailable)"
            )
            error.__cause__ = cause
            return error


# -- the sink ----------------------------------------------------------------------------


class Projection(Protocol[Row]):
    """A sink's rows and store. A projection whose class sets ``traced = True`` gets a span
    per message with rows, the child of the message's trace context (the cost rows and the
    webhook deliveries: the ends of a request's trace); the others (the archive, budgets)
    are not traced, which keeps a traced worker's spans to the hops a trace is read for."""

    stage: str

    def rows(self, message: Message) -> list[Row]:
        """The rows of one message; raise (``EventDecodeError`` best) to dead-letter it."""
        ...

    def write(self, rows: Sequence[Row], dedup_token: str) -> None: ...


class _Rejected(Exception):
    def __init__(self, failure: WriteFailure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


class BatchAbandoned(Exception):
    """The batch is given up without a commit: its messages come again to whoever owns them."""


def _no_report(exc: BaseException) -> None:
    return None


# what a commit may fail with after a rebalance; the batch is then redelivered and
# deduplicated, and the consumer rejoins on its next poll
_COMMIT_RETRIABLE = frozenset({KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
                               KafkaError.UNKNOWN_MEMBER_ID, KafkaError._STATE,
                               KafkaError._NO_OFFSET,
                               # the group's coordinator broker died or moved (a cluster
                               # lost a broker): the next batch's commit covers this one
                               KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
                               KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                               KafkaError.REQUEST_TIMED_OUT, KafkaError._TIMED_OUT,
                               KafkaError._TRANSPORT, KafkaError._WAIT_COORD})


class BatchingSink(Generic[Row]):
    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Sequence[str],
        deadletter_topic: str,
        group_id: str,
        projection: Projection[Row],
        max_rows: int = 1000,
        max_seconds: float = 1.0,
        fault: str = "",
        session_timeout_ms: int = 10_000,
        max_poll_interval_ms: int = 300_000,
        retry_base_seconds: float = 0.5,
        retry_cap_seconds: float = 30.0,
        report: Callable[[BaseException], None] = _no_report,
        clock: Callable[[], float] = time.monotonic,
        consumer: Consumer | None = None,
        deadletters: EventProducer | None = None,
        kafka_config: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        """``report`` hears of every error the sink survives (Sentry, in ``aipipe run``);
        ``consumer`` and ``deadletters`` replace the Kafka clients built from ``bootstrap``
        (unit tests); ``kafka_config`` adds to theirs (the sign-in, for SASL); ``name``
        (the stage's by default) names the sink in ``/healthz`` and ``/readyz``, for two
        sinks of one stage."""
        self.topics = list(topics)
        self.name = name or projection.stage
        self.group_id = group_id
        self._assigned = False  # for /readyz, read from the sink's thread every 5 s
        self._lag = LagGauge(group_id)
        self._lag_at = 0.0
        self.deadletter_topic = deadletter_topic
        self.projection = projection
        self.traced = bool(getattr(projection, "traced", False))
        self._consumed = metrics.EVENTS_CONSUMED.labels(projection.stage)  # per message: once
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self.retry_base_seconds = retry_base_seconds
        self.retry_cap_seconds = retry_cap_seconds
        self.faults = FaultPoints(fault, clock)
        self.report = report
        self.clock = clock
        self.batch = Batch()
        self.written = 0
        self.held: list[Message] = []  # polled while a write was being retried
        self.stop = threading.Event()
        self._flushing = False
        self._revoked = False
        self._failed = False
        self._dead_in_flush = 0  # messages whose rows the store rejected, in this flush
        self._rejected_rows = 0
        self.consumer = consumer or Consumer(
            {
                **(kafka_config or {}),
                "bootstrap.servers": bootstrap,
                "group.id": group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "logger": LIBRDKAFKA_LOGGER,
                # a sink that died is replaced after this, not librdkafka's default 45 s
                "session.timeout.ms": session_timeout_ms,
                "heartbeat.interval.ms": min(3000, session_timeout_ms // 5),
                # librdkafka refuses a poll interval shorter than the session timeout
                "max.poll.interval.ms": max(max_poll_interval_ms, session_timeout_ms),
            }
        )
        self.deadletters = deadletters or EventProducer(bootstrap, **(kafka_config or {}))

    @property
    def stage(self) -> str:
        return self.projection.stage

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._failed:
            return
        if self._flushing:  # revoked while a write is retried: that batch is abandoned
            self._revoked = True
            return
        self.flush(can_poll=False)  # write what was read before the partitions move

    def run(self, stop: threading.Event) -> None:
        self.stop = stop
        self.consumer.subscribe(self.topics, on_revoke=self._on_revoke)
        log.info("sink_started", stage=self.stage, topics=self.topics)
        self._observe_health()
        try:
            while not stop.is_set():
                self._observe()
                if self.held:
                    messages, self.held = self.held, []
                else:
                    messages = self.consumer.consume(num_messages=self.max_rows, timeout=0.2)
                for message in messages:
                    self.add(message)
                if self.batch.due(self.max_rows, self.max_seconds, self.clock()):
                    self.flush()
            self.flush()
        except BaseException:
            self._failed = True  # closing must not flush again into a broken store
            raise
        finally:
            if stop.is_set():
                HEALTH.forget(self.part)
            self.consumer.close()
            self.deadletters.close()

    @property
    def part(self) -> str:
        """This sink's thread in ``/healthz``."""
        return f"sink-{self.name}"

    def _observe_health(self) -> None:
        HEALTH.beat(self.part)
        HEALTH.set_ready(f"{self.name}_store_reachable", True)  # migrated at start
        HEALTH.ready_when(f"{self.name}_partitions_assigned", lambda: self._assigned)

    def _observe(self) -> None:
        """A heartbeat per loop (a poll waits 0.2 s at most), the lag every 5 s."""
        HEALTH.beat(self.part)
        now = time.monotonic()
        if now - self._lag_at < 5.0:
            return
        self._lag_at = now
        held = self.consumer.assignment()
        self._assigned = bool(held)
        lags = {}
        for tp in self.consumer.position(held) if held else []:
            _, high = self.consumer.get_watermark_offsets(tp, timeout=1.0, cached=True)
            if high >= 0 and tp.offset >= 0:
                lags[(tp.topic, tp.partition)] = high - tp.offset
        self._lag.update(lags)

    def add(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.fatal() or error.code() in _CONSUMER_FATAL:
                raise SinkFatalError(f"Kafka refuses this consumer: {error.str()}; fix the "
                                     "setting or the ACL it names and restart.")
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("kafka_consume_error", error=error.str())
            return
        self._consumed.inc()
        message = readable(message)
        topic, partition, offset = coordinates(message)
        digest = message_digest(message)
        self.batch.track(topic, partition, offset, self.clock(), digest)
        try:
            rows = self.projection.rows(message)
        except EventDecodeError as exc:
            self.dead_letter(message, exc.reason, type(exc).__name__)
            self.batch.dead += 1
            return
        except MemoryError:
            raise
        except Exception as exc:  # RecursionError, ValueError, ...: this message, not the sink
            log.error("sink_rows_failed", stage=self.stage, error=f"{type(exc).__name__}: {exc}",
                      topic=topic, partition=partition, offset=offset)
            self.report(exc)
            self.dead_letter(message, unreadable_reason(self.stage, exc), type(exc).__name__)
            self.batch.dead += 1
            return
        self.batch.entries.append(Entry(topic, partition, offset, message, rows, digest))
        if rows and self.traced and tracing.enabled:
            self.batch.spans.append(tracing.start_consumer(
                f"sink {self.stage}", message.headers(), rows[0], **{
                    "messaging.system": "kafka", "messaging.destination.name": topic,
                    "messaging.kafka.partition": partition, "messaging.kafka.offset": offset}))

    def dead_letter(self, message: Message, reason: str, error: str) -> None:
        topic, partition, offset = coordinates(message)
        stage = self.stage
        if topic == self.deadletter_topic:  # never feed a dead letter back into its topic
            log.error("deadletter_not_recycled", stage=stage, reason=reason,
                      partition=partition, offset=offset)
            return
        log.warning("event_dead_lettered", stage=stage, reason=reason,
                    topic=topic, partition=partition, offset=offset)
        metrics.DEAD_LETTERS.labels(stage).inc()
        headers = message.headers() or []
        letter = build_dead_letter(  # a dead letter always fits
            message.key(), message.value(),
            list(headers.items()) if isinstance(headers, dict) else headers,
            reason=reason, error=error, stage=stage, topic=topic, partition=partition,
            offset=offset)
        self.deadletters.send_raw(self.deadletter_topic, letter.key, letter.value,
                                  letter.headers)

    def flush(self, can_poll: bool = True) -> None:
        """Write the batch (retrying, splitting, or failing as ``classify`` says), then commit.

        ``can_poll`` is False inside a rebalance callback, where the consumer cannot be
        polled: a transient failure there abandons the batch to the partitions' next owner.
        """
        batch, self.batch = self.batch, Batch()
        if not batch.next_offsets:
            return
        self.faults.reached("sink_raise")
        started = time.monotonic()
        self._flushing, self._revoked = True, False
        self._dead_in_flush = self._rejected_rows = 0
        try:
            with_rows = [entry for entry in batch.entries if entry.rows]
            if with_rows:
                self._write_isolating(with_rows, batch.dedup_token(), can_poll)
        except BatchAbandoned as exc:
            self.held.clear()  # not committed: these come again from the committed offsets
            log.warning("sink_batch_abandoned", stage=self.stage, reason=str(exc),
                        messages=len(batch), token=batch.dedup_token())
            end_spans(batch.spans, f"abandoned: {exc}")
            return
        finally:
            self._flushing = False
        self.deadletters.flush()  # every dead letter acknowledged before the offsets move
        self._commit(batch)
        end_spans(batch.spans)
        dead = batch.dead + self._dead_in_flush
        rows = sum(len(e.rows) for e in batch.entries) - self._rejected_rows
        self.written += rows
        metrics.SINK_BATCHES.labels(self.stage).inc()
        metrics.SINK_ROWS.labels(self.stage).inc(rows)
        metrics.SINK_BATCH_SECONDS.labels(self.stage).observe(time.monotonic() - started)
        log.info("sink_batch_written", stage=self.stage, rows=rows, dead_letters=dead,
                 total=self.written)

    def _commit(self, batch: Batch) -> None:
        try:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, n) for (t, p), n in batch.next_offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not isinstance(error, KafkaError) or error.code() not in _COMMIT_RETRIABLE:
                raise
            log.warning("sink_commit_failed", stage=self.stage, error=error.str(),
                        token=batch.dedup_token())

    def _write_isolating(self, entries: Sequence[Entry[Row]], token: str,
                         can_poll: bool) -> None:
        """Write the rows of ``entries``; halve them while the store rejects them, and
        dead-letter each message whose rows it rejects on their own."""
        if len(entries) == 0:
            return
        try:
            self._write_retrying([r for e in entries for r in e.rows], token, can_poll)
            return
        except _Rejected as rejected:
            failure, cause = rejected.failure, rejected.__cause__ or rejected
        if len(entries) == 1:
            [entry] = entries
            self.report(cause)
            self.dead_letter(entry.message, rejected_reason(failure), failure.error)
            self._dead_in_flush += 1
            self._rejected_rows += len(entry.rows)
            return
        left, right = halves(entries)
        log.warning("sink_batch_split", stage=self.stage, messages=len(entries),
                    error=failure.reason, token=token)
        for part in (left, right):
            self._write_isolating(
                part, ranges_token((e.topic, e.partition, e.offset, e.digest) for e in part),
                can_poll)

    def _write_retrying(self, rows: Sequence[Row], token: str, can_poll: bool) -> None:
        attempt = 0
        while True:
            try:
                self._write(rows, token)
                if attempt:
                    HEALTH.set_ready(f"{self.name}_store_reachable", True)
                return
            except Exception as exc:
                failure = classify(exc)
                if failure.kind is FailureKind.REJECTED:
                    raise _Rejected(failure) from exc
                if failure.kind is FailureKind.FATAL:
                    raise SinkFatalError(
                        f"The {self.stage} sink cannot write to ClickHouse any more "
                        f"({failure.reason.rstrip('.')}); the process must restart."
                    ) from exc
                attempt += 1
                metrics.SINK_RETRIES.labels(self.stage).inc()
                HEALTH.set_ready(f"{self.name}_store_reachable", False)
                delay = backoff_delay(attempt, self.retry_base_seconds, self.retry_cap_seconds)
                log.warning("sink_write_retry", stage=self.stage, attempt=attempt,
                            retry_in_seconds=delay, rows=len(rows), error=failure.reason,
                            token=token)
                if attempt == 1:
                    self.report(exc)
                if not can_poll:
                    raise BatchAbandoned("a write failed while the partitions were being revoked"
                                     ) from exc
                self._wait_polling(delay)

    def _write(self, rows: Sequence[Row], token: str) -> None:
        self.faults.reached("before_insert")
        self.faults.write(lambda: self.projection.write(rows, token))
        self.faults.reached("after_insert")

    def _wait_polling(self, seconds: float) -> None:
        """Wait ``seconds`` with the partitions paused, polling all the while, so the group
        keeps this consumer (librdkafka's ``max.poll.interval.ms``) however long the store
        stays away; abandon the batch when the sink stops or loses its partitions."""
        self.consumer.pause(self.consumer.assignment())
        try:
            deadline = self.clock() + seconds
            while (left := deadline - self.clock()) > 0:
                HEALTH.beat(self.part)  # waiting out the store is progress of a kind
                if self.stop.is_set():
                    raise BatchAbandoned("the sink is stopping")
                # paused partitions return nothing; anything else waits for the next batch
                self.held.extend(self.consumer.consume(num_messages=self.max_rows,
                                                       timeout=min(left, 0.5)))
                if self._revoked:
                    raise BatchAbandoned("its partitions were revoked during the retries")
        finally:
            with suppress(KafkaException):
                self.consumer.resume(self.consumer.assignment())

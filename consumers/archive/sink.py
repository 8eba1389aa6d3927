"""Archive rows from Kafka messages (pure), their store, and the batching sink."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from clickhouse_connect.driver.exceptions import ClickHouseError
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from consumers.costs.rows import to_millis
from consumers.costs.sink import Batch, FaultPoints, coordinates
from consumers.costs.store import StoreError, database_name
from schemas.deadletter import REASON, read_headers
from schemas.errors import EventDecodeError
from schemas.events import decode

log = structlog.get_logger("aipipe.archive")
TABLE = "events_archive"


@dataclass(frozen=True, slots=True)
class ArchiveRow:
    event_id: str
    event_type: str
    client_id: str
    request_id: str
    operation_id: str
    occurred_at: datetime
    payload: str
    deadletter_reason: str
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    kafka_timestamp: datetime


ARCHIVE_COLUMNS = tuple(f.name for f in fields(ArchiveRow))


def archive_row(value: bytes | None, headers: Any, topic: str, partition: int, offset: int,
                timestamp_ms: int, deadletter_topic: str) -> ArchiveRow:
    """The row for one message: the event's envelope when it decodes, its coordinates if not."""
    at = datetime.fromtimestamp(max(timestamp_ms, 0) / 1000, UTC)
    raw = (value or b"").decode("utf-8", "replace")
    coordinates_id = f"{topic}:{partition}:{offset}"
    if topic == deadletter_topic:
        reason = read_headers(headers).get(REASON, "")
        return ArchiveRow(coordinates_id, "deadletter", _field(value, "client_id"),
                          _field(value, "request_id"), "", to_millis(at), raw, reason, topic,
                          partition, offset, to_millis(at))
    try:
        event = decode(value)
    except EventDecodeError as exc:
        return ArchiveRow(coordinates_id, "invalid", _field(value, "client_id"),
                          _field(value, "request_id"), "", to_millis(at), raw, exc.reason,
                          topic, partition, offset, to_millis(at))
    return ArchiveRow(
        event.event_id, event.event_type, event.client_id, event.request_id,
        str(getattr(event, "operation_id", "") or (
            event.event_id if event.event_type == "operation.requested" else "")),
        to_millis(event.occurred_at), raw, "", topic, partition, offset, to_millis(at),
    )


def _field(value: bytes | None, name: str) -> str:
    try:
        data = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return ""
    found = data.get(name) if isinstance(data, dict) else None
    return found if isinstance(found, str) else ""


class ArchiveStore:
    """``events_archive`` in ``database``; inserts carry the batch's deduplication token."""

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.database = database_name(database)

    def write(self, rows: Sequence[ArchiveRow], dedup_token: str) -> None:
        if not rows:
            return
        try:
            self.client.insert(TABLE, [astuple(r) for r in rows],
                               column_names=list(ARCHIVE_COLUMNS), database=self.database,
                               settings={"insert_deduplication_token": dedup_token})
        except ClickHouseError as exc:
            raise StoreError(f"ClickHouse could not archive {len(rows)} events: {exc}") from exc


class ArchiveSink:
    """Consume ``topics``; insert each batch, then commit its offsets (as ``CostSink``)."""

    def __init__(self, *, bootstrap: str, topics: Sequence[str], deadletter_topic: str,
                 group_id: str, store: ArchiveStore, max_rows: int = 1000,
                 max_seconds: float = 1.0, fault: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.topics = list(topics)
        self.deadletter_topic = deadletter_topic
        self.store = store
        self.max_rows, self.max_seconds = max_rows, max_seconds
        self.faults = FaultPoints(fault)
        self.clock = clock
        self.batch, self.rows = Batch(), list[ArchiveRow]()
        self.written = 0
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 1000,
        })

    def run(self, stop: threading.Event) -> None:
        self.consumer.subscribe(self.topics, on_revoke=lambda *_: self.flush())
        log.info("archive_sink_started", topics=len(self.topics))
        try:
            while not stop.is_set():
                for message in self.consumer.consume(num_messages=self.max_rows, timeout=0.2):
                    self.add(message)
                if self.batch.due(self.max_rows, self.max_seconds, self.clock()) or (
                        len(self.rows) >= self.max_rows):
                    self.flush()
            self.flush()
        finally:
            self.consumer.close()

    def add(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("kafka_consume_error", error=error.str())
            return
        topic, partition, offset = coordinates(message)
        self.batch.track(topic, partition, offset, self.clock())
        _, timestamp = message.timestamp()
        self.rows.append(archive_row(message.value(), message.headers(), topic, partition,
                                     offset, timestamp, self.deadletter_topic))

    def flush(self) -> None:
        batch, rows = self.batch, self.rows
        self.batch, self.rows = Batch(), []
        if not batch.next_offsets:
            return
        self.faults.reached("archive_before_insert")
        self.store.write(rows, dedup_token=f"archive:{batch.dedup_token()}")
        self.faults.reached("archive_after_insert")
        self.consumer.commit(
            offsets=[TopicPartition(t, p, n) for (t, p), n in batch.next_offsets.items()],
            asynchronous=False,
        )
        self.written += len(rows)
        log.info("archive_batch_written", rows=len(rows), total=self.written)

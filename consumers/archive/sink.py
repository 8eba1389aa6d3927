"""Archive rows from Kafka messages (pure), their store, and the batching sink."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import orjson
import structlog
from clickhouse_connect.driver.exceptions import ClickHouseError
from confluent_kafka import Message

from aipipe.consumers.archive.redact import archive_payload, parsed_payload
from aipipe.consumers.costs.rows import to_millis
from aipipe.consumers.costs.store import StoreError, database_name
from aipipe.consumers.sink import BatchingSink, coordinates
from aipipe.schemas.deadletter import REASON, read_headers
from aipipe.schemas.errors import EventDecodeError
from aipipe.schemas.events import decode_obj, parse

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


# ``occurred_at`` picks an archive row's month partition, and on the requests topic a
# client writes it: one request a month apart each made a partition each (12,000 requests,
# 12,000 partitions). So an event whose own time lies further than this from its record's
# (the broker's append time on the requests topic, see ``runner.prepare_topics``) is filed
# under the record's time; its payload keeps the time it was sent with.
FILED_BEFORE = timedelta(days=31)
FILED_AFTER = timedelta(days=1)

ARCHIVE_COLUMNS = tuple(f.name for f in fields(ArchiveRow))
# a row's values in column order (``dataclasses.astuple`` deep-copies each value: 6 % of
# a busy ``aipipe run all`` worker went there)
_row_values = attrgetter(*ARCHIVE_COLUMNS)


def archive_row(value: bytes | None, headers: Any, topic: str, partition: int, offset: int,
                timestamp_ms: int, deadletter_topic: str, keep_prompts: bool = False) -> ArchiveRow:
    """The row for one message: the event's envelope when it decodes, its coordinates if not."""
    at = datetime.fromtimestamp(max(timestamp_ms, 0) / 1000, UTC)
    coordinates_id = f"{topic}:{partition}:{offset}"
    if topic == deadletter_topic:
        reason = read_headers(headers).get(REASON, "")
        return ArchiveRow(coordinates_id, "deadletter", _field(value, "client_id"),
                          _field(value, "request_id"), "", to_millis(at),
                          archive_payload(value, keep_prompts), reason, topic, partition,
                          offset, to_millis(at))
    try:  # parsed once, for the payload and the event
        data, shallow = parse(value)
        raw = parsed_payload(value or b"", data, keep_prompts)
        event = decode_obj(data, depth_checked=shallow)
    except EventDecodeError as exc:
        return ArchiveRow(coordinates_id, "invalid", _field(value, "client_id"),
                          _field(value, "request_id"), "", to_millis(at),
                          archive_payload(value, keep_prompts), exc.reason, topic, partition,
                          offset, to_millis(at))
    # (a validated event's fields are in its __dict__: getattr of one its type lacks goes
    # through pydantic's __getattr__ and an AttributeError)
    return ArchiveRow(
        event.event_id, event.event_type, event.client_id, event.request_id,
        str(event.__dict__.get("operation_id") or (
            event.event_id if event.event_type == "operation.requested" else "")),
        to_millis(filed_at(event.occurred_at, at if timestamp_ms > 0 else None)), raw, "",
        topic, partition, offset, to_millis(at),
    )


def filed_at(occurred_at: datetime, record_time: datetime | None) -> datetime:
    """The time an event is archived under: its own, unless that lies more than
    ``FILED_BEFORE`` before or ``FILED_AFTER`` after its record's (then the record's)."""
    if record_time is None or (record_time - FILED_BEFORE <= occurred_at
                               <= record_time + FILED_AFTER):
        return occurred_at
    return record_time


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
            self.client.insert(TABLE, [_row_values(r) for r in rows],
                               column_names=list(ARCHIVE_COLUMNS), database=self.database,
                               settings={"insert_deduplication_token": dedup_token})
        except ClickHouseError as exc:
            raise StoreError(f"ClickHouse could not archive {len(rows)} events: {exc}") from exc


class ArchiveProjection:
    stage = "archive"

    def __init__(self, store: ArchiveStore, deadletter_topic: str,
                 keep_prompts: bool = False) -> None:
        self.store = store
        self.deadletter_topic = deadletter_topic
        self.keep_prompts = keep_prompts

    def rows(self, message: Message) -> list[ArchiveRow]:
        topic, partition, offset = coordinates(message)
        _, timestamp = message.timestamp()
        return [archive_row(message.value(), message.headers(), topic, partition, offset,
                            timestamp, self.deadletter_topic, self.keep_prompts)]

    def write(self, rows: Sequence[ArchiveRow], dedup_token: str) -> None:
        self.store.write(rows, dedup_token=dedup_token)


class ArchiveSink(BatchingSink[ArchiveRow]):
    """Every message of ``topics`` into the archive, invalid events included (as such).

    Only a message whose row ClickHouse refuses is dead-lettered (see ``BatchingSink``);
    one from the dead-letter topic itself is logged and skipped, never sent back to it.
    """

    def __init__(self, *, topics: Sequence[str], deadletter_topic: str, store: ArchiveStore,
                 keep_prompts: bool = False, **options: Any) -> None:
        super().__init__(topics=topics, deadletter_topic=deadletter_topic,
                         projection=ArchiveProjection(store, deadletter_topic, keep_prompts),
                         **options)

"""Replay: rebuild the cost projection from the completed-operations log into another ClickHouse.

``plan`` turns ``--from``/``--to`` into per-partition offset ranges ``[start, end)``: Kafka's
``offsets_for_times`` on the record timestamps (the produce time; see DESIGN.md), the end
being the high watermark at planning time when no ``--to`` is given. ``Replayer`` reads
exactly those offsets with a consumer of its own (assigned partitions, no group, nothing
committed), maps each event with the live sink's own ``row_from_completed``, re-prices it if
asked, and writes batches through ``ClickHouseCostStore.write`` with a deterministic
deduplication token. No provider is ever called: the events hold everything a row needs.

The manifest (topic, offset ranges, price version, counts) is written into the target's
``replay_manifest`` table, where ``aipipe replay verify`` finds it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from aipipe.consumers.costs.rows import row_from_completed, to_millis
from aipipe.consumers.costs.store import ClickHouseCostStore, StoreError
from aipipe.consumers.replay.pricefile import price_table_json
from aipipe.consumers.replay.reprice import RepriceReport, reprice
from aipipe.consumers.rollups import MONTHS_PER_INSERT, by_months
from aipipe.consumers.sink import Batch, Entry, coordinates, message_digest
from aipipe.producers.messages import readable
from aipipe.producers.producer import LIBRDKAFKA_LOGGER
from aipipe.schemas.errors import AipipeError, EventDecodeError
from aipipe.schemas.events import OperationCompleted, decode
from aipipe.schemas.prices import PriceTable

log = structlog.get_logger("aipipe.replay")
MANIFEST_TABLE = "replay_manifest"


class ReplayError(AipipeError):
    """Replay could not plan or finish; the message says why and what to change."""


@dataclass(frozen=True)
class Range:
    """Offsets ``[start, end)`` of one partition."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


@dataclass
class Manifest:
    replay_id: str
    topic: str
    database: str
    from_time: str | None
    to_time: str | None
    ranges: list[Range]
    price_version: str  # the re-pricing table's version, or "as recorded"
    recorded_price_versions: list[str] = field(default_factory=list)
    price_table: dict[str, Any] | None = None
    events: int = 0
    rows: int = 0
    skipped: int = 0
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    reprice: dict[str, Any] | None = None

    @property
    def rows_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows_per_second"] = round(self.rows_per_second, 1)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        data = {k: v for k, v in data.items() if k != "rows_per_second"}
        data["ranges"] = [Range(**r) for r in data["ranges"]]
        return cls(**data)


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def replay_consumer(bootstrap: str, **config: Any) -> Consumer:
    """A reader of assigned partitions; ``config`` adds to it (the sign-in, for SASL)."""
    return Consumer({
        **config,
        "bootstrap.servers": bootstrap,
        "group.id": f"aipipe-replay-{uuid.uuid4().hex}",  # never joined: partitions are assigned
        "logger": LIBRDKAFKA_LOGGER,
        "enable.auto.commit": False,
        "enable.partition.eof": False,
        "auto.offset.reset": "earliest",
    })


def plan(consumer: Consumer, topic: str, start: datetime | None, end: datetime | None,
         timeout: float = 30.0) -> list[Range]:
    """Per partition, the offsets whose record time is in ``[start, end)``."""
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
    except KafkaException as exc:
        raise ReplayError(f"Kafka did not answer for topic {topic} ({exc}).") from exc
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise ReplayError(f"Topic {topic} does not exist; check AIPIPE_TOPIC_PREFIX and "
                          "AIPIPE_KAFKA_BOOTSTRAP.")
    ranges = []
    for partition in sorted(found.partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                   timeout=timeout)
        first = _offset_at(consumer, topic, partition, start, high, timeout) if start else low
        last = _offset_at(consumer, topic, partition, end, high, timeout) if end else high
        ranges.append(Range(partition, max(first, low), max(min(last, high), max(first, low))))
    return ranges


def _offset_at(consumer: Consumer, topic: str, partition: int, moment: datetime, high: int,
               timeout: float) -> int:
    """The first offset whose record time is at or after ``moment`` (``high`` if none)."""
    (found,) = consumer.offsets_for_times([TopicPartition(topic, partition, _millis(moment))],
                                          timeout=timeout)
    if found.error is not None:
        raise ReplayError(f"Kafka could not find offsets by time on {topic}[{partition}]: "
                          f"{found.error}.")
    return high if found.offset < 0 else int(found.offset)


class Replayer:
    """Read the planned ranges into ``store``; return the manifest."""

    def __init__(
        self,
        consumer: Consumer,
        store: ClickHouseCostStore,
        *,
        batch_rows: int = 5000,
        prices: PriceTable | None = None,
        progress: Callable[[int, int], None] = lambda done, total: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.store = store
        self.batch_rows = batch_rows
        self.prices = prices
        self.progress = progress
        self.clock = clock

    def run(self, topic: str, ranges: Sequence[Range], start: datetime | None = None,
            end: datetime | None = None) -> Manifest:
        began, started_at = self.clock(), datetime.now(UTC)
        manifest = Manifest(
            replay_id=str(uuid.uuid4()), topic=topic, database=self.store.database,
            from_time=start.isoformat() if start else None,
            to_time=end.isoformat() if end else None,
            ranges=list(ranges),
            price_version=self.prices.version if self.prices else "as recorded",
            price_table=price_table_json(self.prices) if self.prices else None,
            started_at=started_at.isoformat(),
        )
        report = RepriceReport(self.prices.version) if self.prices else None
        versions: set[str] = set()
        ends = {r.partition: r.end for r in ranges if r.size}
        total = sum(r.size for r in ranges)
        self.progress(0, total)
        if ends:
            self.consumer.assign([TopicPartition(topic, r.partition, r.start)
                                  for r in ranges if r.size])
        batch, done = Batch(), 0
        try:
            while ends:
                messages = self.consumer.consume(num_messages=self.batch_rows, timeout=0.5)
                if not messages:
                    self._past_end(topic, ends)
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            raise ReplayError(f"Kafka failed while replaying {topic}: "
                                              f"{error.str()}.")
                        continue
                    t, p, offset = coordinates(message)
                    if p not in ends or offset >= ends[p]:
                        continue
                    done += 1
                    message = readable(message)  # (as the live sink: headers read once)
                    digest = message_digest(message)
                    batch.track(t, p, offset, 0.0, digest)
                    event = self._completed(message.value(), manifest)
                    if event is not None:
                        row = row_from_completed(event, t, p, offset)
                        versions.add(row.price_version)
                        if self.prices is not None and report is not None:
                            repriced = reprice(row, self.prices, event.usage)
                            report.add(row, repriced)
                            row = repriced
                        batch.entries.append(Entry(t, p, offset, message, [row], digest))
                    if offset + 1 >= ends[p]:
                        del ends[p]
                        self.consumer.incremental_unassign([TopicPartition(t, p)])
                    if len(batch) >= self.batch_rows:
                        self._write(batch, manifest)
                        batch = Batch()
                        self.progress(done, total)
            self._write(batch, manifest)
        finally:
            self.consumer.close()
        self.progress(done, total)
        manifest.events = done
        manifest.recorded_price_versions = sorted(versions)
        manifest.reprice = report.to_json() if report else None
        manifest.finished_at = datetime.now(UTC).isoformat()
        manifest.seconds = round(self.clock() - began, 3)
        write_manifest(self.store, manifest)
        log.info("replay_finished", events=manifest.events, rows=manifest.rows,
                 skipped=manifest.skipped, seconds=manifest.seconds)
        return manifest

    def _past_end(self, topic: str, ends: dict[int, int]) -> None:
        """Drop partitions whose position is past the range (the last offsets were markers)."""
        positions = self.consumer.position([TopicPartition(topic, p) for p in ends])
        for tp in positions:
            if tp.offset >= 0 and tp.offset >= ends.get(tp.partition, 0):
                del ends[tp.partition]

    def _completed(self, value: bytes | None, manifest: Manifest) -> OperationCompleted | None:
        try:
            event = decode(value)
        except EventDecodeError:
            manifest.skipped += 1  # the live sink dead-lettered it; so does not the replay
            return None
        if not isinstance(event, OperationCompleted):
            manifest.skipped += 1
            return None
        return event

    def _write(self, batch: Batch, manifest: Manifest) -> None:
        """The batch's rows, a few months at a time (one batch of a topic's history can
        span more months than ClickHouse takes in one insert)."""
        if not batch.rows:
            return
        token = f"replay:{batch.dedup_token()}"
        chunks = list(by_months(batch.rows, MONTHS_PER_INSERT, lambda row: row.requested_at))
        for number, chunk in enumerate(chunks):
            self.store.write(chunk, dedup_token=token if len(chunks) == 1 else f"{token}#{number}")
        manifest.rows += len(batch.rows)


def write_manifest(store: ClickHouseCostStore, manifest: Manifest) -> None:
    try:
        store.client.insert(
            MANIFEST_TABLE,
            [[manifest.replay_id, to_millis(datetime.fromisoformat(manifest.finished_at)),
              manifest.topic, manifest.price_version, manifest.events, manifest.rows,
              orjson.dumps(manifest.to_json()).decode()]],
            column_names=["replay_id", "finished_at", "topic", "price_version", "events",
                          "rows", "manifest"],
            database=store.database,
        )
    except Exception as exc:
        raise StoreError(f"ClickHouse could not record the replay manifest: {exc}") from exc


def latest_manifest(client: Any, database: str) -> Manifest | None:
    rows = client.query(
        f"SELECT manifest FROM `{database}`.{MANIFEST_TABLE} ORDER BY finished_at DESC LIMIT 1"
    ).result_rows
    return Manifest.from_json(orjson.loads(rows[0][0])) if rows else None

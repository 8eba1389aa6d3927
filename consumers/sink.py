"""The batching sink: the one Kafka consumer loop behind every ClickHouse projection.

Order per batch (at-least-once, made exact by idempotent writes):
  1. poll messages until the batch is full or old enough;
  2. send what the projection cannot decode to the dead-letter topic and wait for the ack;
  3. write the batch's rows with a deterministic deduplication token;
  4. commit the offsets, only now.
A crash anywhere repeats at most the batch. A projection says how a message becomes rows
(``rows``, raising ``EventDecodeError`` to dead-letter it) and how rows are written.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from producers.producer import EventProducer
from schemas.deadletter import deadletter_headers
from schemas.errors import EventDecodeError

log = structlog.get_logger("aipipe.sink")
Row = TypeVar("Row")


def coordinates(message: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed (not an error) message."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


@dataclass
class Batch:
    """What one flush writes: rows, dead letters, and the offsets to commit after."""

    rows: list[Any] = field(default_factory=list)
    dead: int = 0
    first: dict[tuple[str, int], int] = field(default_factory=dict)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    started: float = 0.0

    def __len__(self) -> int:
        return len(self.rows) + self.dead

    def track(self, topic: str, partition: int, offset: int, now: float) -> None:
        if not self.next_offsets:
            self.started = now
        self.first.setdefault((topic, partition), offset)
        self.next_offsets[(topic, partition)] = offset + 1

    def dedup_token(self) -> str:
        """The same messages always give the same token, whichever process retries them."""
        return ";".join(
            f"{t}:{p}:{self.first[(t, p)]}-{n - 1}"
            for (t, p), n in sorted(self.next_offsets.items())
        )

    def due(self, max_rows: int, max_seconds: float, now: float) -> bool:
        return bool(self.next_offsets) and (
            len(self) >= max_rows or now - self.started >= max_seconds
        )


class FaultPoints:
    """SIGKILL this process at a named point, for fault tests.

    ``AIPIPE_FAULT=after_insert@3`` kills the sink the third time it has written a batch
    and not yet committed its offsets; ``before_insert@N`` kills it just before.
    """

    def __init__(self, spec: str) -> None:
        point, _, nth = spec.partition("@")
        self.point, self.nth, self.seen = point, int(nth or 1), 0

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.seen += 1
        if self.seen == self.nth:
            log.warning("fault_injected", point=point, nth=self.nth)
            os.kill(os.getpid(), signal.SIGKILL)


class Projection(Protocol[Row]):
    stage: str

    def rows(self, message: Message) -> list[Row]:
        """The rows of one message; raise ``EventDecodeError`` to dead-letter it."""
        ...

    def write(self, rows: Sequence[Row], dedup_token: str) -> None: ...


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = list(topics)
        self.deadletter_topic = deadletter_topic
        self.projection = projection
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self.faults = FaultPoints(fault)
        self.clock = clock
        self.batch = Batch()
        self.written = 0
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # a sink that died is replaced after this, not librdkafka's default 45 s
                "session.timeout.ms": session_timeout_ms,
                "heartbeat.interval.ms": min(3000, session_timeout_ms // 5),
            }
        )
        self.deadletters = EventProducer(bootstrap)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.flush()  # write what was read before the partitions move to another sink

    def run(self, stop: threading.Event) -> None:
        self.consumer.subscribe(self.topics, on_revoke=self._on_revoke)
        log.info("sink_started", stage=self.projection.stage, topics=self.topics)
        try:
            while not stop.is_set():
                for message in self.consumer.consume(num_messages=self.max_rows, timeout=0.2):
                    self.add(message)
                if self.batch.due(self.max_rows, self.max_seconds, self.clock()):
                    self.flush()
            self.flush()
        finally:
            self.consumer.close()
            self.deadletters.close()

    def add(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("kafka_consume_error", error=error.str())
            return
        topic, partition, offset = coordinates(message)
        self.batch.track(topic, partition, offset, self.clock())
        try:
            self.batch.rows.extend(self.projection.rows(message))
        except EventDecodeError as exc:
            self.dead_letter(message, exc)

    def dead_letter(self, message: Message, exc: EventDecodeError) -> None:
        topic, partition, offset = coordinates(message)
        stage = self.projection.stage
        log.warning("event_dead_lettered", stage=stage, reason=exc.reason,
                    topic=topic, partition=partition, offset=offset)
        self.deadletters.send_raw(
            self.deadletter_topic,
            message.key(),
            message.value() or b"",
            deadletter_headers(
                reason=exc.reason, error=type(exc).__name__, stage=stage,
                topic=topic, partition=partition, offset=offset,
                original=message.headers() or [],
            ),
        )
        self.batch.dead += 1

    def flush(self) -> None:
        batch, self.batch = self.batch, Batch()
        if not batch.next_offsets:
            return
        if batch.dead:
            self.deadletters.flush()
        if batch.rows:
            self.faults.reached("before_insert")
            self.projection.write(batch.rows, batch.dedup_token())
            self.faults.reached("after_insert")
        self.consumer.commit(
            offsets=[TopicPartition(t, p, n) for (t, p), n in batch.next_offsets.items()],
            asynchronous=False,
        )
        self.written += len(batch.rows)
        log.info("sink_batch_written", stage=self.projection.stage, rows=len(batch.rows),
                 dead_letters=batch.dead, total=self.written)

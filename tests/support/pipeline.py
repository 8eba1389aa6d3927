"""Helpers for tests that drive real workers: produce, read back, consume a topic."""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import Consumer, Message

from aipipe.consumers.costs.store import ClickHouseCostStore
from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.producers import EventProducer
from aipipe.reader import pipeline_store
from aipipe.schemas.events import Event


def produce(settings: Settings, topic: str, events: Iterable[Event]) -> None:
    with EventProducer(settings.kafka_bootstrap) as producer:
        producer.send_many(topic, events)


def produce_raw(settings: Settings, topic: str, values: Iterable[tuple[bytes, bytes]]) -> None:
    with EventProducer(settings.kafka_bootstrap) as producer:
        for key, value in values:
            producer.send_raw(topic, key, value)


def store_of(
    settings: Settings, worker: WorkerProcess, timeout: float = 120
) -> ClickHouseCostStore:
    """The cost store as other processes see it: through the owning worker's endpoint."""
    try:
        return pipeline_store(settings, worker.alive, timeout)
    except RuntimeError as exc:
        raise AssertionError(f"{exc}:\n{worker.log_tail()}") from exc


def operations_recorded(store: ClickHouseCostStore) -> int:
    return sum(count for count, _ in store.totals().values())


def rows_and_operations(store: ClickHouseCostStore) -> tuple[int, int]:
    """Rows as billing reads them (FINAL) and distinct operations: equal when none is doubled."""
    rows = store.client.query(
        f"SELECT count(), uniqExact(operation_id) FROM {store.table} FINAL"
    ).result_rows
    return int(rows[0][0]), int(rows[0][1])


def wait_recorded(
    store: ClickHouseCostStore, expected: int, timeout: float, worker: WorkerProcess | None = None
) -> None:
    def done() -> bool:
        if worker is not None and not worker.alive():
            raise AssertionError(f"worker exited early:\n{worker.log_tail()}")
        return operations_recorded(store) >= expected

    wait_for(done, timeout, f"{expected} operations in ClickHouse", interval=0.3)


def consume(settings: Settings, topic: str, expected: int, timeout: float = 60) -> list[Message]:
    """Read ``topic`` from the start until ``expected`` messages arrived (or the deadline)."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}-reader-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is None:
                    messages.append(message)
    finally:
        consumer.close()
    return messages

"""What happened to every request: its decision, its completion, its cost row.

``Ledger`` reads the decision and completion topics from the start with a plain
confluent-kafka consumer (its own group) and keeps, per operation, how many distinct
decision and completion events were seen; a test asserts every produced request has
exactly one of each. ``physical_cost_rows`` counts the rows of ``ai_cost_tracking``
without ``FINAL`` after ``OPTIMIZE ... FINAL``, in a process of its own that opens the
chDB path once its owner has stopped, so a duplicate that ``FINAL`` would hide (a copy
in another month's partition, say) is counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from decimal import Decimal

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from aipipe.infra.settings import Settings
from aipipe.producers import EventProducer
from aipipe.schemas.events import OperationRequested

IMAGE_MODEL = "gemini-2.5-flash-image"
#: one simulated image with the prompt "p": 1 input token at $0.30/M, 1290 output at $30/M
IMAGE_COST = (Decimal("0.30") + 1290 * Decimal(30)) / Decimal(1_000_000)


def image_requests(count: int, clients: int, prefix: str = "r") -> list[OperationRequested]:
    return [
        OperationRequested(
            request_id=f"{prefix}{i}", client_id=f"client-{i % clients}",
            operation_type="image_generation", provider="simulated", model=IMAGE_MODEL,
            params={"prompt": "p"},
        )
        for i in range(count)
    ]


def produce_backlog(settings: Settings, events: Iterable[OperationRequested]) -> int:
    n = 0
    with EventProducer(settings.kafka_bootstrap) as producer:
        for event in events:
            producer.send(settings.topics.requested, event)
            n += 1
    return n


class Ledger:
    """Decisions and completions per operation id, read from the topics as they arrive."""

    def __init__(self, settings: Settings, in_group: bool = True) -> None:
        """``in_group=False``: read every partition without joining a group, so that the
        ledger never waits on a group coordinator (a test that kills brokers)."""
        t = settings.topics
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}-ledger-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        })
        topics = [t.admitted, t.rejected, t.completed]
        if in_group:
            self.consumer.subscribe(topics)
        else:
            meta = self.consumer.list_topics(timeout=30)
            self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for topic in topics
                                  for p in meta.topics[topic].partitions])
        self.decision_ids: dict[str, set[str]] = {}  # operation -> distinct decision event ids
        self.completion_ids: dict[str, set[str]] = {}
        self.reasons: Counter[str] = Counter()
        self.last_decision: dict[str, dict[str, object]] = {}

    def poll(self, timeout: float = 0.3) -> None:
        for message in self.consumer.consume(num_messages=5000, timeout=timeout):
            if message.error() is not None:
                continue
            try:  # a test may have put garbage on these topics on purpose
                event = orjson.loads(message.value() or b"{}")
                kind, operation_id = event["event_type"], event["operation_id"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            book = self.completion_ids if kind == "operation.completed" else self.decision_ids
            seen = book.setdefault(operation_id, set())
            if kind == "operation.rejected" and event["event_id"] not in seen:
                self.reasons[event["reason"]] += 1
            if kind != "operation.completed":
                self.last_decision[operation_id] = event
            seen.add(event["event_id"])

    def decided(self) -> int:
        return len(self.decision_ids)

    def completed(self) -> int:
        return len(self.completion_ids)

    def completed_for(self, operation_id: str) -> bool:
        return operation_id in self.completion_ids

    def close(self) -> None:
        self.consumer.close()

    def problems(self, expected: Iterable[str]) -> list[str]:
        """Each expected operation without exactly one decision and one completion."""
        out = []
        for op in expected:
            decisions = len(self.decision_ids.get(op, ()))
            completions = len(self.completion_ids.get(op, ()))
            if decisions != 1 or completions != 1:
                out.append(f"{op}: {decisions} decisions, {completions} completions")
        return out


_COUNT = """
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
table = f"{sys.argv[2]}.ai_cost_tracking"
client.command(f"OPTIMIZE TABLE {table} FINAL")
rows, ops = client.query(f"SELECT count(), uniqExact(operation_id) FROM {table}").result_rows[0]
per_client = client.query(
    f"SELECT client_id, toString(sum(cost_usd)), count() FROM {table} GROUP BY client_id"
).result_rows
print(json.dumps({"rows": rows, "operations": ops,
                  "per_client": {c: [s, n] for c, s, n in per_client}}))
"""


def physical_cost_rows(settings: Settings) -> dict[str, object]:
    """Rows and distinct operations without ``FINAL`` (after ``OPTIMIZE FINAL``).

    Runs in its own process on the chDB path, so the owning worker must have stopped.
    """
    out = subprocess.run(
        [sys.executable, "-c", _COUNT, settings.clickhouse_dsn, settings.clickhouse_database],
        capture_output=True, text=True, timeout=180, check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def read_topic(settings: Settings, topic: str, quiet_seconds: float = 3.0) -> list[Message]:
    """Every message of ``topic`` from the start, until none came for ``quiet_seconds``."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"{settings.topic_prefix}-read-{time.monotonic_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[Message] = []
    quiet = time.monotonic() + quiet_seconds + 2  # the first fetch takes a moment
    try:
        while time.monotonic() < quiet:
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                if message.error() is None:
                    out.append(message)
                    quiet = time.monotonic() + quiet_seconds
    finally:
        consumer.close()
    return out

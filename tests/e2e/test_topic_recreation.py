"""A completed topic deleted and created again under its name: its offsets start at 0 again,
and the cost sink must not take the new batches for retries of the old ones.

A real ``aipipe run costs`` on the local Kafka with the embedded ClickHouse engine; the
two incarnations of the topic get the same number of messages, so their batches cover the
same offsets and, with tokens made of offsets alone, the same tokens.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationCompleted, Usage
from tests.support.pipeline import produce, store_of
from tests.support.rows import totals_of

pytestmark = pytest.mark.e2e

BATCH = 12


def completed(n: int, client: str, incarnation: int) -> OperationCompleted:
    return OperationCompleted(
        request_id=f"req-{incarnation}-{n}",
        client_id=client,
        operation_id=f"op-{incarnation}-{n}",
        requested_at=datetime.now(UTC),
        operation_type="text_generation",
        provider="simulated",
        model="gemini-2.5-flash",
        success=True,
        usage=Usage(input_tokens=100 + n, output_tokens=10),
        cost_usd=Decimal("0.000123457") * (n + 1) * incarnation,
        price_version="2025-10-01",
        duration_ms=50 + n,
    )


def costs_batches_written(worker: WorkerProcess) -> list[int]:
    """The rows of each batch the costs stage wrote (and committed), from its log."""
    rows = []
    for line in worker.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"sink_batch_written"' in line:
            record = json.loads(line)
            if record.get("event") == "sink_batch_written" and record.get("stage") == "costs":
                rows.append(int(record["rows"]))
    return rows


def topic_ids(admin: AdminClient, topic: str) -> set[str]:
    """The ids of ``topic`` the broker knows: empty while it does not exist."""
    try:
        [future] = admin.describe_topics(TopicCollection([topic])).values()
        return {str(future.result(10).topic_id)}
    except KafkaException:
        return set()


def recreate(settings: Settings, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    old = topic_ids(admin, topic)
    assert old, f"{topic} should exist"
    admin.delete_topics([topic], operation_timeout=30)[topic].result(30)
    wait_for(lambda: not topic_ids(admin, topic), 60, f"{topic} deleted")
    prepare_topics(settings)
    wait_for(lambda: bool(topic_ids(admin, topic)) and topic_ids(admin, topic) != old, 60,
             f"{topic} created again")


def test_a_recreated_completed_topic_loses_no_rows(settings: Settings) -> None:
    settings = settings.model_copy(update={"partitions": 1, "sink_batch_size": BATCH,
                                           "sink_batch_seconds": 30.0,
                                           "archive_events": False})
    prepare_topics(settings)
    topic = settings.topics.completed
    first = [completed(n, f"client-{n % 3}", 1) for n in range(BATCH)]
    second = [completed(n, f"client-{n % 3}", 2) for n in range(BATCH)]

    # each incarnation: BATCH messages at offsets 0..BATCH-1, in the topic before the sink
    # reads, so each makes exactly one batch of the same offsets
    produce(settings, topic, first)
    before = WorkerProcess(settings, "costs", settings.home / "costs-before.log").start()
    try:
        wait_for(lambda: costs_batches_written(before) == [BATCH], 120,
                 "the first incarnation's batch written")
        store = store_of(settings, before)
        assert store.totals() == totals_of(first)
    finally:
        before.stop()
    assert before.wait_exit(30) == 0, before.log_tail()

    recreate(settings, topic)
    produce(settings, topic, second)
    after = WorkerProcess(settings, "costs", settings.home / "costs-after.log").start()
    try:
        wait_for(lambda: costs_batches_written(after) == [BATCH], 120,
                 "the second incarnation's batch written")
        store = store_of(settings, after)
        [(physical,)] = store.client.query(f"SELECT count() FROM {store.table}").result_rows
        assert physical == 2 * BATCH
        assert store.totals() == totals_of(first + second)
    finally:
        after.stop()

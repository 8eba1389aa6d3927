"""Requests waiting when a worker restarts with dedup state to recover are decided once.

When the changelogs hold records, faust's start-up reads them with its fetcher running,
resumes the stream partitions once they are read, and only then seeks them to their
committed offsets (``Recovery.on_recovery_completed``). A fetch in between hands the
waiting requests to admission, and the seek fetches them again: the same records twice,
within milliseconds, so both copies landed in one admission batch. Each copy was looked
up in ``seen-requests`` before either was marked, and each got a decision (seen in CI as
the "start-up race" of ``test_dedup_horizon.py``, README "Dedup state and its horizon").
A request twice in one batch is decided once.

Here the dedup horizon is the default (7 days), so the changelogs' records stay on the
broker and every start-up reads them; the requests are produced while the worker is
stopped and just after it starts, on every partition.
"""

from __future__ import annotations

import time
from collections import Counter

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from tests.e2e.test_dedup_horizon import uncommitted
from tests.support.ledger import image_requests, produce_backlog

pytestmark = pytest.mark.e2e

CLIENTS = 6  # two per partition
RESTARTS = 2


def decisions_per_operation(settings: Settings, topic: str) -> Counter[str]:
    """Messages per operation on ``topic``, every partition read to its high watermark."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"{settings.topic_prefix}-count-{time.monotonic_ns()}",
                         "enable.auto.commit": False})
    counts: Counter[str] = Counter()
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), 10)
                for p in partitions}
        consumer.assign([TopicPartition(topic, p, low) for p, (low, high) in ends.items()
                         if high > low])
        left = {p: high for p, (low, high) in ends.items() if high > low}
        deadline = time.monotonic() + 60
        while left:
            assert time.monotonic() < deadline, f"{topic} not read to its end: {left}"
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is None:
                    counts[orjson.loads(message.value())["operation_id"]] += 1
                    if message.offset() + 1 >= left.get(message.partition(), 0):
                        left.pop(message.partition(), None)
    finally:
        consumer.close()
    return counts


def test_requests_waiting_at_a_restart_that_recovers_tables_are_decided_once(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"rate_limit": "1000000/1s"})
    prepare_topics(settings)
    topics = settings.topics
    produced: list[str] = []

    def send(prefix: str) -> None:
        batch = image_requests(30, CLIENTS, prefix=prefix)
        produce_backlog(settings, batch)
        produced.extend(r.event_id for r in batch)

    def all_decided_and_committed(worker: WorkerProcess) -> bool:
        assert worker.alive(), worker.log_tail()
        return (uncommitted(settings, topics.requested) == 0
                and set(decisions_per_operation(settings, topics.admitted)) >= set(produced))

    worker = WorkerProcess(settings, "all", log_path=settings.home / "all-0.log").start()
    try:
        send("a-")  # marks in the changelogs: every later start-up has tables to recover
        wait_for(lambda: all_decided_and_committed(worker), 120,
                 "the first requests decided and committed")
        for restart in range(1, RESTARTS + 1):
            worker.stop()
            send(f"r{restart}w-")  # waiting when the worker starts
            worker = WorkerProcess(
                settings, "all", log_path=settings.home / f"all-{restart}.log").start()
            send(f"r{restart}s-")  # while it starts
            # every request acknowledged: each copy's decision is on the broker
            wait_for(lambda w=worker: all_decided_and_committed(w), 120,
                     f"restart {restart}: every request decided and committed")
            decisions = decisions_per_operation(settings, topics.admitted)
            twice = {op: n for op, n in decisions.items() if n != 1}
            assert twice == {}, f"restart {restart}: decided more than once: {twice}"
        assert sorted(decisions) == sorted(produced)
    finally:
        worker.stop()

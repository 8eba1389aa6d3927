"""An upstream that writes requests in Kafka transactions (a Java service with
exactly-once, or librdkafka's transactional producer here).

Each transaction ends with a commit or abort marker: an offset of the partition that
holds no record, which no consumer is handed. The streams' consumer used to learn such
offsets only from a read offset it no longer keeps, so it never committed past the first
marker: the committed offset stayed there, every later request was fetched again after
each restart, and the stalled-partition check fetched it again every 15 s. Here the
markers are passed, and the committed offset reaches the end of the partition.

The streams read uncommitted records (so that a transaction left open cannot hold a
partition back): a request in an aborted transaction is decided like any other.
"""

from __future__ import annotations

import uuid

import orjson
import pytest
from confluent_kafka import Producer

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationRequested, encode
from tests.e2e.test_dedup_horizon import uncommitted
from tests.support.pipeline import consume, produce

pytestmark = pytest.mark.e2e

CLIENT = "client-tx"  # one client: one partition, in the order produced


def request(name: str) -> OperationRequested:
    return OperationRequested(
        request_id=name, client_id=CLIENT, operation_type="image_generation",
        provider="simulated", model="gemini-2.5-flash-image", params={"prompt": name})


def test_the_committed_offset_passes_the_markers_of_a_transactional_upstream(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"rate_limit": "1000000/1s"})
    prepare_topics(settings)
    topic = settings.topics.requested
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap,
                         "transactional.id": f"{settings.topic_prefix}-{uuid.uuid4().hex}"})
    producer.init_transactions(30)
    committed, aborted = [request("tx-1"), request("tx-2")], [request("tx-aborted")]
    for events, end in ((committed, producer.commit_transaction),
                        (aborted, producer.abort_transaction)):
        producer.begin_transaction()
        for event in events:
            producer.produce(topic, encode(event), key=CLIENT)
        producer.flush(30)
        end(30)
    later = [request("plain-1"), request("plain-2")]
    produce(settings, topic, later)  # after both markers
    worker = WorkerProcess(settings, "streams").start()
    try:
        decisions = consume(settings, settings.topics.admitted, expected=5, timeout=120)
        assert sorted(orjson.loads(m.value())["request_id"] for m in decisions) == sorted(
            e.request_id for e in [*committed, *aborted, *later])

        def all_committed() -> bool:
            assert worker.alive(), worker.log_tail()
            return uncommitted(settings, topic) == 0

        # 5 records and 2 markers: the committed offset is the partition's end, 7
        wait_for(all_committed, 60, "the streams' committed offset at the end of the "
                 "requests partition")
    finally:
        worker.stop()

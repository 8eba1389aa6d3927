"""The producer against the real local Kafka: keys, headers, and failures raised."""

from __future__ import annotations

import pytest

from aipipe.infra.settings import Settings
from aipipe.producers import DeliveryError, EventProducer
from aipipe.runner import prepare_topics
from aipipe.schemas import OperationRequested, decode
from aipipe.schemas.deadletter import read_headers
from tests.support.pipeline import consume

pytestmark = pytest.mark.e2e


def event(i: int) -> OperationRequested:
    return OperationRequested(
        request_id=f"req-{i}", client_id=f"client-{i % 3}", operation_type="text_generation",
        model="gemini-2.5-flash", params={"prompt": "hi"},
    )


def test_events_are_keyed_by_client_with_request_id_and_type_headers(settings: Settings) -> None:
    prepare_topics(settings)
    sent = [event(i) for i in range(9)]
    with EventProducer(settings.kafka_bootstrap) as producer:
        producer.send_many(settings.topics.requested, sent)
    assert producer.delivered == 9

    got = consume(settings, settings.topics.requested, expected=9)
    assert sorted(decode(m.value()).event_id for m in got) == sorted(e.event_id for e in sent)
    partitions: dict[bytes, set[int]] = {}
    for m in got:
        partitions.setdefault(m.key(), set()).add(m.partition())
        headers = read_headers(m.headers())
        assert headers["event_type"] == "operation.requested"
        assert headers["request_id"] == decode(m.value()).request_id
    assert set(partitions) == {b"client-0", b"client-1", b"client-2"}
    assert all(len(p) == 1 for p in partitions.values())  # one client, one partition


def test_an_unacknowledged_event_is_raised_to_the_caller() -> None:
    producer = EventProducer("127.0.0.1:1", **{"message.timeout.ms": 1500})
    producer.send("nowhere", event(1))
    with pytest.raises(DeliveryError, match="1 events failed delivery"):
        producer.flush(timeout=30)

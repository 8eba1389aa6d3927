"""The producer against the real local Kafka: keys, headers, and failures raised."""

from __future__ import annotations

import pytest

from aipipe.infra.settings import Settings
from aipipe.producers import DeliveryError, EventProducer
from aipipe.runner import prepare_topics
from aipipe.schemas import OperationRequested, decode
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
    # the bytes on the wire are pydantic's JSON of each event
    wire = sorted(e.__pydantic_serializer__.to_json(e) for e in sent)
    assert sorted(m.value() for m in got) == wire
    partitions: dict[bytes, set[int]] = {}
    for m in got:
        partitions.setdefault(m.key(), set()).add(m.partition())
        assert m.headers() == [
            ("request_id", decode(m.value()).request_id.encode()),
            ("event_type", b"operation.requested"),
        ]
    assert set(partitions) == {b"client-0", b"client-1", b"client-2"}
    assert all(len(p) == 1 for p in partitions.values())  # one client, one partition


def test_an_unacknowledged_event_is_raised_to_the_caller() -> None:
    producer = EventProducer("127.0.0.1:1", **{"message.timeout.ms": 1500})
    producer.send("nowhere", event(1))
    with pytest.raises(DeliveryError, match="1 events failed delivery"):
        producer.flush(timeout=30)


def test_a_full_local_queue_holds_the_sender_until_there_is_room(settings: Settings) -> None:
    """librdkafka's queue takes 5 messages here: send waits on deliveries, loses none."""
    prepare_topics(settings)
    sent = [event(i) for i in range(60)]
    with EventProducer(settings.kafka_bootstrap,
                       **{"queue.buffering.max.messages": 5}) as producer:
        for e in sent:
            producer.send(settings.topics.requested, e)
    assert (producer.sent, producer.delivered, producer.failed) == (60, 60, 0)
    got = consume(settings, settings.topics.requested, expected=60)
    assert sorted(decode(m.value()).event_id for m in got) == sorted(e.event_id for e in sent)


def test_an_event_kafka_refuses_to_queue_is_raised_at_send(settings: Settings) -> None:
    prepare_topics(settings)
    producer = EventProducer(settings.kafka_bootstrap, **{"message.max.bytes": 2000})
    big = OperationRequested(
        request_id="req-big", client_id="client-0", operation_type="text_generation",
        model="gemini-2.5-flash", params={"prompt": "x" * 5000},
    )
    refused = f"Kafka refused the event for {settings.topics.requested}: .*MSG_SIZE_TOO_LARGE"
    with pytest.raises(DeliveryError, match=refused):
        producer.send(settings.topics.requested, big)
    assert producer.sent == 0
    producer.flush()

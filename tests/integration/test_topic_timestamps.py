"""The requests topic keeps the broker's time from its first record.

The topic is created with ``message.timestamp.type=LogAppendTime``: when the setting came
only from an alteration after the creation, a record written right after ``prepare_topics``
could reach the broker before it had applied the change and keep the producer's time (an
archive row of the year 1970 in ``test_archive_partitions``, once, in a full CI run). The
race needs a busy broker: this test passed six times of six on the old code on an idle
one, so it pins the property rather than reproducing the failure.
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, Consumer, Producer

from aipipe.infra.settings import Settings
from aipipe.runner import prepare_topics


def test_records_written_right_after_prepare_topics_carry_the_brokers_time(
        settings: Settings) -> None:
    written_at = time.time()
    prepare_topics(settings)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0})
    for partition in range(settings.partitions):
        producer.produce(settings.topics.requested, b"{}", partition=partition,
                         timestamp=1_000)  # 1970, as a producer may claim
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"ts-{uuid.uuid4().hex}", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe([settings.topics.requested])
    stamps = []
    deadline = time.monotonic() + 60
    try:
        while len(stamps) < settings.partitions:
            assert time.monotonic() < deadline, f"{len(stamps)} records read back"
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                stamps.append(message.timestamp())
    finally:
        consumer.close()
    assert {kind for kind, _ in stamps} == {TIMESTAMP_LOG_APPEND_TIME}
    assert all(at / 1000 >= written_at - 5 for _, at in stamps), stamps

"""A client cannot choose the archive's month partitions, nor the requests' record times.

A real ``aipipe run all`` (streams, cost sink, archive) on the local Kafka. The requests
are produced with confluent-kafka as any client could: each with an ``occurred_at`` a
month apart from the others' (years 1100-1112) and a record timestamp of 1970. The
broker stamps the requests topic's records itself (``LogAppendTime``), and the archive
files an event whose own time is far from its record's under the record's time: the 150
requests, their 150 rejections and one honest request land in this month's partition
(or the next, across midnight at a month's end), each payload as sent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Producer

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas import encode
from tests.support.ledger import image_requests
from tests.support.pipeline import store_of

pytestmark = pytest.mark.e2e
COUNT = 150


def utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def test_a_clients_clock_cannot_spread_the_archive_over_months(settings: Settings) -> None:
    prepare_topics(settings)
    started = datetime.now(UTC) - timedelta(seconds=5)
    honest, *hostile = image_requests(COUNT + 1, 3, prefix="arch-")
    hostile = [r.model_copy(update={"occurred_at": datetime(1100 + i // 12, i % 12 + 1, 1,
                                                            tzinfo=UTC)})
               for i, r in enumerate(hostile)]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for request in [*hostile, honest]:
        producer.produce(settings.topics.requested, encode(request),
                         key=request.client_id.encode(), timestamp=1_000)  # 1970
    assert producer.flush(30) == 0

    worker = WorkerProcess(settings, "all").start()
    try:
        store = store_of(settings, worker)
        db = store.table.split(".")[0]

        def archived() -> list[tuple[str, str, int, datetime, datetime]]:
            assert worker.alive(), worker.log_tail()
            return [(kind, op, part, utc(at), utc(record)) for kind, op, part, at, record in
                    store.client.query(
                f"SELECT event_type, operation_id, _partition_id, occurred_at, "
                f"kafka_timestamp FROM {db}.events_archive FINAL WHERE event_type IN "
                "('operation.requested', 'operation.rejected', 'operation.admitted')"
            ).result_rows]

        wait_for(lambda: len(archived()) == 2 * COUNT + 2, 180,
                 "the requests and their decisions archived", interval=0.5)
        rows = archived()
    finally:
        worker.stop()

    now = datetime.now(UTC)
    months = {started.strftime("%Y%m"), now.strftime("%Y%m")}
    assert {partition for _, _, partition, _, _ in rows} <= months
    requests = {op: (at, record) for kind, op, _, at, record in rows
                if kind == "operation.requested"}
    assert len(requests) == COUNT + 1
    assert all(started <= record <= now  # the broker's time, not the producer's 1970
               for _, record in requests.values())
    assert requests[honest.event_id][0] == honest.occurred_at.replace(
        microsecond=honest.occurred_at.microsecond // 1000 * 1000)  # an honest time is kept
    assert all(started <= at <= now for op, (at, _) in requests.items() if op != honest.event_id)

"""Dedup state expires after the horizon (``AIPIPE_DEDUP_HORIZON_HOURS``), here 20 seconds.

One ``aipipe run`` (streams and cost sink) and one client, so every request, its
decision and its completion share a partition and a marker request produced after the
others is handled after them. A redelivery inside the horizon is skipped: exactly one
decision and one completion per request. Once the horizon has passed the purge empties
the dedup tables (the worker's ``aipipe_dedup_keys`` gauge), and after a restart (which
replays the changelogs) a redelivery is no longer remembered, but its ``occurred_at`` is
older than the horizon less the clock skew: it is refused (one ``invalid`` rejection
each), never run again, and the cost table keeps one row per operation. An admitted
operation read again past the horizon is not run either (dead-lettered); if an attempt of
it was cut short by a crash (the last test, with a 60 s horizon), that attempt is announced.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.deadletter import REASON, STAGE, read_headers
from aipipe.schemas.events import OperationAdmitted, OperationRequested
from aipipe.streams.admission import decide
from tests.e2e.test_metrics import free_port, get
from tests.support.ledger import IMAGE_COST, image_requests, produce_backlog
from tests.support.pipeline import consume, produce, rows_and_operations, store_of

pytestmark = pytest.mark.e2e

HORIZON = 20.0  # seconds
COUNT = 10
CLIENT = "client-0"


def marker(name: str) -> OperationRequested:
    return image_requests(1, 1, prefix=name)[0].model_copy(update={"event_id": name})


def per_operation(settings: Settings, topic: str, until: str, timeout: float = 120) -> Counter[str]:
    """Messages per operation on ``topic``, read from the start until ``until``'s arrived."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"{settings.topic_prefix}-count-{time.monotonic_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    counts: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    try:
        while until not in counts:
            assert time.monotonic() < deadline, f"no {until} on {topic}: {counts}"
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is None:
                    counts[orjson.loads(message.value())["operation_id"]] += 1
    finally:
        consumer.close()
    return counts


def uncommitted(settings: Settings, topic: str) -> int:
    """Records of ``topic`` past the streams group's committed offsets."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"{settings.topic_prefix}-streams",
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        left = 0
        for tp in consumer.committed([TopicPartition(topic, p) for p in partitions], 10):
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), 10)
            left += high - max(tp.offset, 0)
        return left
    finally:
        consumer.close()


def rejected(settings: Settings) -> list[tuple[str, str]]:
    """``(detail, operation_id)`` of every rejection so far."""
    topic = settings.topics.rejected
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"{settings.topic_prefix}-rejected-{time.monotonic_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1]
                for p in partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        out: list[tuple[str, str]] = []
        deadline = time.monotonic() + 60
        while any(consumer.position([TopicPartition(topic, p)])[0].offset < end
                  for p, end in ends.items() if end > 0):
            assert time.monotonic() < deadline, "the rejections could not be read"
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is None:
                    event = orjson.loads(message.value())
                    out.append((event["detail"], event["operation_id"]))
        return out
    finally:
        consumer.close()


def dedup_keys(port: int) -> dict[str, float]:
    try:
        status, body = get(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return {}
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^aipipe_dedup_keys\{table="([^"]+)"\} (\S+)$', body.decode(), re.M)} \
        if status == 200 else {}


def ready(port: int, worker: WorkerProcess) -> bool:
    assert worker.alive(), worker.log_tail()
    try:
        return get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    except OSError:
        return False


@pytest.mark.alone  # the redelivery must be handled within the 20 s horizon
def test_a_redelivery_inside_the_horizon_is_skipped_and_one_after_it_is_refused(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={
        "dedup_horizon_hours": HORIZON / 3600, "rate_limit": "1000000/1s",
        "clock_skew_seconds": 2.0,  # requests older than 18 s are refused
    })
    prepare_topics(settings)
    topics = settings.topics
    port = free_port()
    worker = WorkerProcess(settings, "all", log_path=settings.home / "all-0.log").start(
        metrics_port=str(port))
    try:
        wait_for(lambda: ready(port, worker), 120, "the worker ready")
        requests = image_requests(COUNT, 1, prefix="h-")  # occurred_at: now
        ops = [r.event_id for r in requests]
        # -- inside the horizon: the redelivered requests are skipped --
        started = time.monotonic()  # before any request is marked
        produce_backlog(settings, requests)
        per_operation(settings, topics.completed, until=ops[-1])
        produce_backlog(settings, [*requests, marker("m1")])
        decisions = per_operation(settings, topics.admitted, until="m1")
        completions = per_operation(settings, topics.completed, until="m1")
        inside = time.monotonic() - started
        assert inside < HORIZON, f"the redelivery took {inside:.1f}s, past the horizon"
        assert decisions == Counter({**dict.fromkeys(ops, 1), "m1": 1})
        assert completions == Counter({**dict.fromkeys(ops, 1), "m1": 1})

        # -- past the horizon: the purge empties the tables --
        wait_for(lambda: dedup_keys(port) == dict.fromkeys(
            ("seen-requests", "done-operations", "started-operations"), 0.0),
            HORIZON + 60, f"dedup tables emptied by the purge: {dedup_keys(port)}")

        # -- a restart replays the changelogs; what it brings back is past the horizon --
        # (faust commits every 2.8 s: a restart before the last requests' offsets are
        # committed would redeliver them, and, past the horizon, decide them again, which
        # is at-least-once working, not what this part tests)
        wait_for(lambda: uncommitted(settings, topics.requested) == 0, 60,
                 "the streams group's offsets committed past every request")
        worker.stop()
        restarted = datetime.now(UTC)
        worker = WorkerProcess(settings, "all", log_path=settings.home / "all-1.log").start(
            metrics_port=str(port))
        # produced while it starts, on purpose: when the changelogs still hold the expired
        # marks, the start-up reads them, resumes the requests partition and only then
        # seeks it back to its committed offset, so these records reach admission twice in
        # one batch, where each used to get a decision (test_admission_restart.py)
        produce_backlog(settings, [*requests, marker("m2")])
        decisions = per_operation(settings, topics.admitted, until="m2")
        assert decisions == Counter({**dict.fromkeys(ops, 1), "m1": 1, "m2": 1})
        refused: dict[str, list[str]] = {}

        def rejections() -> Counter[str]:
            refused.clear()
            for detail, op in rejected(settings):
                refused.setdefault(op, []).append(detail)
            return Counter({op: len(details) for op, details in refused.items()})

        wait_for(lambda: rejections() == Counter(dict.fromkeys(ops, 1)), 120,
                 "each redelivered request refused once", interval=1)
        assert all("older than the 18 s this pipeline remembers requests for" in d[0]
                   for d in refused.values()), refused
        assert per_operation(settings, topics.completed, until="m2") == Counter(
            {**dict.fromkeys(ops, 1), "m1": 1, "m2": 1})  # nothing ran a second time

        # -- the cost table: one row per operation, only the marker's written since --
        store = store_of(settings, worker)

        def written_since_restart() -> int:
            assert worker.alive(), worker.log_tail()
            return int(store.client.query(
                f"SELECT countIf(ingested_at >= {{t:DateTime64(3, 'UTC')}}) FROM {store.table}",
                parameters={"t": restarted}).result_rows[0][0])

        wait_for(lambda: written_since_restart() == 1, 120, "the marker's row stored")
        assert store.totals() == {CLIENT: (COUNT + 2, (COUNT + 2) * IMAGE_COST)}
        assert rows_and_operations(store) == (COUNT + 2, COUNT + 2)
        assert rejections() == Counter(dict.fromkeys(ops, 1))  # and still once each
    finally:
        worker.stop()


def test_an_admitted_operation_older_than_the_horizon_is_dead_lettered_not_run(
    settings: Settings,
) -> None:
    """An admission read again after its done mark may have expired (a consumer group reset
    to old offsets, workers stopped for longer than the horizon) is not run a second time:
    it goes to the dead-letter topic with the reason. A recent one beside it runs."""
    prepare_topics(settings)
    old, recent = image_requests(2, 1, prefix="stale-")
    now = datetime.now(UTC)
    then = now - timedelta(hours=168, minutes=1)
    week_ago = decide(old.model_copy(update={"occurred_at": then}), then)
    just_now = decide(recent, now)
    assert isinstance(week_ago, OperationAdmitted) and isinstance(just_now, OperationAdmitted)
    produce(settings, settings.topics.admitted, [week_ago, just_now])
    worker = WorkerProcess(settings, "streams").start()
    try:
        [letter] = consume(settings, settings.topics.deadletter, 1, timeout=120)
        completions = consume(settings, settings.topics.completed, 1, timeout=120)
        assert worker.alive(), worker.log_tail()
    finally:
        worker.stop()
    headers = read_headers(letter.headers())
    assert headers[STAGE] == "generation" and orjson.loads(letter.value())["operation_id"] == \
        week_ago.operation_id
    assert headers[REASON].startswith("Operation admitted at ") and \
        "so it may have run already and is not run again" in headers[REASON]
    assert [orjson.loads(m.value())["operation_id"] for m in completions] == [
        just_now.operation_id]
    assert len(consume(settings, settings.topics.completed, 2, timeout=3)) == 1


def test_an_attempt_cut_short_before_its_operation_went_stale_is_still_announced(
    settings: Settings,
) -> None:
    """A worker killed during a provider call and started again only once the operation is
    older than the horizon: the operation is not run again (it is dead-lettered, as above),
    and its attempt, whose start record is younger than the horizon, is announced with
    ``operation.interrupted``, as a re-run would have announced it (the provider may have
    billed it)."""
    from aipipe.streams.admission.gate import rules_from_settings
    from tests.e2e.test_generation_crash import read_all, started_marks

    horizon, port = 60.0, free_port()
    settings = settings.model_copy(update={
        "dedup_horizon_hours": horizon / 3600, "clock_skew_seconds": 0.0,
        "metrics_port": port, "simulated_max_latency_ms": 120_000,
    })
    prepare_topics(settings)
    request = image_requests(1, 1, prefix="cut-")[0]
    request = request.model_copy(update={
        "params": {**request.params, "simulate": {"latency_ms": 120_000}}})
    worker = WorkerProcess(settings, "streams", log_path=settings.home / "first.log").start()
    try:
        wait_for(lambda: ready(port, worker), 120, "the streams worker ready")
        then = datetime.now(UTC) - timedelta(seconds=horizon - 20)  # 20 s left to run it
        admitted = decide(request.model_copy(update={"occurred_at": then}), then,
                          rules_from_settings(settings))
        assert isinstance(admitted, OperationAdmitted)
        produce(settings, settings.topics.admitted, [admitted])
        wait_for(lambda: started_marks(settings) == 1, 60, "the attempt's start recorded")
        worker.kill()
        wait_for(lambda: datetime.now(UTC) - then > timedelta(seconds=horizon), 60,
                 "the operation past the horizon")
        worker = WorkerProcess(settings, "streams", log_path=settings.home / "second.log").start()
        [letter] = consume(settings, settings.topics.deadletter, 1, timeout=120)
        assert worker.alive(), worker.log_tail()
    finally:
        worker.stop()
    headers = read_headers(letter.headers())
    assert headers[STAGE] == "generation"
    assert "so it may have run already and is not run again" in headers[REASON]
    interrupted = [e for e in read_all(settings, settings.topics.providers)
                   if e.get("event_type") == "operation.interrupted"]
    assert [(e["operation_id"], e["attempt"]) for e in interrupted] == [
        (admitted.operation_id, 1)]
    assert read_all(settings, settings.topics.completed) == []

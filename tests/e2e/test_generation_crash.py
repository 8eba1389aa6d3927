"""A generation worker SIGKILLed with many provider calls in flight.

60 operations of 3 s each (54 images, and 6 videos whose start takes the 3 s) run at once
on one ``aipipe run`` process, which is killed while they are inside the (simulated)
provider, then started again. Every operation must end with exactly one completion and one
cost row; every attempt that the kill interrupted is recorded as ``operation.interrupted``
(the provider may have billed it), and the completion of such an operation says it was
attempt 2 (a video's too, which comes from its polls); no output is stored twice (the
artifact store is content-addressed).
"""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import changelog_topic, prepare_topics
from aipipe.schemas.events import OperationRequested
from tests.e2e.test_scaling import costs_settled
from tests.support.ledger import Ledger, produce_backlog, read_topic

pytestmark = pytest.mark.e2e

N, CLIENTS = 60, 6


def started_marks(settings: Settings) -> int:
    """Records in the ``started-operations`` changelog: attempts whose start is durable."""
    topic = changelog_topic(settings, "started-operations")
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"{settings.topic_prefix}-marks"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in partitions)
    finally:
        consumer.close()


def read_all(settings: Settings, topic: str) -> list[dict[str, object]]:
    return [orjson.loads(m.value() or b"{}") for m in read_topic(settings, topic)]


def test_a_worker_killed_mid_call_completes_each_operation_once_and_records_the_lost_attempts(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={
        "rate_limit": "1000000/1s", "generation_max_in_flight": 64,
        "simulated_max_latency_ms": 3000, "sink_batch_seconds": 0.3,
    })
    prepare_topics(settings)
    requests = [
        OperationRequested(  # every tenth a video, whose start takes the 3 s
            request_id=f"r{i}", client_id=f"client-{i % CLIENTS}",
            operation_type="video_generation" if i % 10 == 9 else "image_generation",
            provider="simulated",
            model="veo-3.0-fast-generate-001" if i % 10 == 9 else "gemini-2.5-flash-image",
            params={"prompt": "p", "simulate": {"latency_ms": 3000}},
        )
        for i in range(N)
    ]
    ledger = Ledger(settings)
    worker = WorkerProcess(settings, "all", log_path=settings.home / "first.log").start()
    try:
        produce_backlog(settings, requests)

        def all_admitted() -> bool:
            ledger.poll()
            assert worker.alive(), worker.log_tail()
            return ledger.decided() == N

        wait_for(all_admitted, 120, "every request admitted")

        def calls_running() -> bool:  # every attempt recorded, not all completed: in calls
            ledger.poll()
            return started_marks(settings) >= N

        # (the decisions can all be out before generation has fetched any of them; all 60
        # start within the first call's 3 s, so the videos are among those cut short)
        wait_for(calls_running, 60, "every provider call running")
        assert ledger.completed() < N  # the calls are still running
        worker.kill()
        in_flight = N - ledger.completed()
        worker = WorkerProcess(settings, "all", log_path=settings.home / "second.log").start()

        def all_completed() -> bool:
            ledger.poll()
            assert worker.alive(), worker.log_tail()
            return ledger.completed() == N

        wait_for(all_completed, 180, "every operation completed after the restart")
        assert ledger.problems(r.event_id for r in requests) == []
        completions = read_all(settings, settings.topics.completed)
        interrupted = [e for e in read_all(settings, settings.topics.providers)
                       if e.get("event_type") == "operation.interrupted"]
        again = {e["operation_id"] for e in completions if e["attempt"] == 2}
        assert again, "the kill interrupted no call"
        videos = {e["operation_id"] for e in completions
                  if e["operation_type"] == "video_generation"}
        assert len(videos) == N // 10 and videos & again, "the kill interrupted no video"
        assert {e["operation_id"] for e in interrupted} == again
        assert all(e["attempt"] == 1 for e in interrupted)
        assert len(again) <= in_flight
        assert all(e["attempt"] in (1, 2) for e in completions)
        digests = {o["sha256"] for e in completions for o in e["outputs"]}  # type: ignore[attr-defined]
        stored = [p.stem for p in (settings.home / "artifacts").rglob("*")
                  if p.is_file() and len(p.stem) == 64]  # not a temp file a kill left
        assert sorted(stored) == sorted(digests)  # one file per content, none twice
        expected: dict[str, tuple[Decimal, int]] = {}
        for e in completions:  # (one each: the ledger found no problem)
            total, count = expected.get(str(e["client_id"]), (Decimal(0), 0))
            expected[str(e["client_id"])] = (total + Decimal(str(e["cost_usd"])), count + 1)
    except BaseException:
        worker.kill()
        raise
    finally:
        ledger.close()
    costs_settled(settings, worker, requests=N, clients=CLIENTS, expected=expected)

"""Generation through the real google-genai SDK against a local fake of Gemini and Vertex.

Workers are real ``aipipe run`` processes on the local Kafka with the embedded ClickHouse;
the SDK in them talks to ``tests.support.fake_gemini`` on loopback
(``AIPIPE_GEMINI_BASE_URL``), which records every request. Waits are scripted short
(``AIPIPE_VIDEO_POLL_BASE_SECONDS``); every wait here is a condition with a deadline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import Consumer
from pydantic import SecretStr

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import (
    Event,
    OperationAdmitted,
    OperationCompleted,
    ProviderCircuitClosed,
    ProviderCircuitOpened,
    VideoPolled,
    VideoPollScheduled,
    VideoStarted,
    decode,
    utcnow,
)
from aipipe.streams.generation.backoff import wait_for_attempt
from tests.support.fake_gemini import FakeGemini, prompt_tokens
from tests.support.fake_sentry import FakeSentry
from tests.support.pipeline import produce, store_of

pytestmark = pytest.mark.e2e

MILLION = Decimal(1_000_000)
VEO = "veo-3.0-generate-001"
IMAGE = "gemini-2.5-flash-image"
TEXT = "gemini-2.5-flash"


class TopicReader:
    """Reads topics from the start and keeps every decoded event, for the whole test."""

    def __init__(self, settings: Settings, *topics: str) -> None:
        self.events: list[Event] = []
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}-reader-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        })
        self.consumer.subscribe(list(topics))

    def until(self, what: str, check: Callable[[list[Event]], bool], timeout: float) -> None:
        def read() -> bool:
            for message in self.consumer.consume(num_messages=500, timeout=0.2):
                if message.error() is None:
                    self.events.append(decode(message.value()))
            return check(self.events)

        wait_for(read, timeout, what, interval=0)

    def of(self, kind: type[Any], operation_id: str | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)
                and (operation_id is None or e.operation_id == operation_id)]

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def fake() -> Iterator[FakeGemini]:
    with FakeGemini() as server:
        yield server


@pytest.fixture
def sentry() -> Iterator[FakeSentry]:
    with FakeSentry() as server:
        yield server


def gemini_settings(settings: Settings, fake: FakeGemini, **changes: Any) -> Settings:
    return settings.model_copy(update={
        "gemini_api_key": SecretStr("test-api-key"),
        "gemini_base_url": fake.base_url,
        "vertex_project": "test-project",
        "vertex_access_token": SecretStr("test-access-token"),
        "video_poll_tick_seconds": 0.02,
        "provider_retry_base_seconds": 0.02,
        "provider_retry_cap_seconds": 0.1,
        **changes,
    })


def request(kind: str, model: str, client: str = "acme", **params: Any) -> OperationAdmitted:
    """An admitted operation: these tests start at generation, admission is not theirs."""
    return OperationAdmitted(
        request_id=f"req-{time.monotonic_ns()}", client_id=client, provider="gemini",
        operation_id=str(uuid.uuid4()), requested_at=utcnow(),
        operation_type=kind, model=model,  # type: ignore[arg-type]
        params={"prompt": "a lighthouse at dawn, watercolour", **params},
    )


def image_cost() -> Decimal:
    tokens = prompt_tokens("a lighthouse at dawn, watercolour")
    return (tokens * Decimal("0.30") + 1290 * Decimal(30)) / MILLION


def rows(store: Any, database: str, operation_id: str) -> list[tuple[Any, ...]]:
    return list(store.client.query(
        f"SELECT success, cost_usd, poll_count, video_duration_seconds, error_message "
        f"FROM {database}.ai_cost_tracking FINAL WHERE operation_id = %(op)s",
        parameters={"op": operation_id},
    ).result_rows)


def assert_schedule(reader: TopicReader, operation_id: str, polls: int, base: float) -> None:
    scheduled = sorted(reader.of(VideoPollScheduled, operation_id), key=lambda e: e.attempt)
    assert sorted({e.attempt for e in scheduled}) == list(range(1, polls + 1))
    for event in scheduled:
        assert event.wait_seconds == wait_for_attempt(event.attempt, base, 1.5, 30.0)
        assert event.due_at == event.occurred_at + timedelta(seconds=event.wait_seconds)


def test_videos_poll_on_schedule_without_blocking_and_errors_end_cleanly(
    settings: Settings, fake: FakeGemini, sentry: FakeSentry
) -> None:
    base = 0.2
    settings = gemini_settings(settings, fake, video_poll_base_seconds=base,
                               sentry_dsn=SecretStr(sentry.dsn))
    prepare_topics(settings)
    reader = TopicReader(settings, settings.topics.video_polls, settings.topics.completed)
    worker = WorkerProcess(settings, "all").start()
    try:
        # a video that needs 6 polls (~4 s of waits), then images on the same partition,
        # the first one answered 503, 503 before it succeeds
        fake.video_polls = 6
        video = request("video_generation", VEO, duration_seconds=8)
        images = [request("image_generation", IMAGE) for _ in range(3)]
        fake.fail_next("generateContent", 503, 503)
        produce(settings, settings.topics.admitted, [video, *images])
        # the completed event is acknowledged before the final video.polled is sent
        reader.until(
            "the video's completed event and its final poll",
            lambda _: bool(reader.of(OperationCompleted, video.operation_id))
            and any(p.final for p in reader.of(VideoPolled, video.operation_id)),
            120,
        )

        done = reader.of(OperationCompleted, video.operation_id)
        assert len(done) == 1 and done[0].success and done[0].poll_count == 6
        assert done[0].usage.video_seconds == 8 and done[0].cost_usd == Decimal("3.2")
        for image in images:  # images flowed while the video waited
            [image_done] = reader.of(OperationCompleted, image.operation_id)
            assert image_done.success and image_done.cost_usd == image_cost()
            assert image_done.occurred_at < done[0].occurred_at
        assert [r.status for r in fake.calls("generateContent")] == [503, 503, 200, 200, 200]
        [started] = reader.of(VideoStarted, video.operation_id)
        assert len(fake.calls("predictLongRunning")) == 1
        assert {r.body["operationName"] for r in fake.calls("fetchPredictOperation")} == {
            started.provider_operation}
        assert_schedule(reader, video.operation_id, 6, base)
        polled = sorted(reader.of(VideoPolled, video.operation_id), key=lambda e: e.attempt)
        assert [(p.attempt, p.done, p.final) for p in polled] == [
            *((n, False, False) for n in range(1, 6)), (6, True, True)]

        store = store_of(settings, worker)
        wait_for(lambda: all(rows(store, settings.clickhouse_database, r.operation_id)
                             for r in [video, *images]), 60, "four cost rows")
        assert rows(store, settings.clickhouse_database, video.operation_id) == [
            (True, Decimal("3.2"), 6, Decimal(8), None)]
        for image in images:  # the one retried twice included: one row each
            assert rows(store, settings.clickhouse_database, image.operation_id) == [
                (True, image_cost(), 0, None, None)]

        # 403 on the first poll: one failure, no more polls, and Sentry hears of it
        fake.fail_next("fetchPredictOperation", 403)
        refused = request("video_generation", VEO, client="globex", duration_seconds=4)
        produce(settings, settings.topics.admitted, [refused])
        reader.until("the refused video's completed event",
                     lambda _: bool(reader.of(OperationCompleted, refused.operation_id)), 60)
        [failed] = reader.of(OperationCompleted, refused.operation_id)
        assert not failed.success and failed.cost_usd == 0 and "403" in str(failed.error_message)
        marker = request("video_generation", VEO, client="globex", duration_seconds=4)
        produce(settings, settings.topics.admitted, [marker])
        reader.until("a later video on the same partition",
                     lambda _: bool(reader.of(OperationCompleted, marker.operation_id)), 60)
        [refused_started] = reader.of(VideoStarted, refused.operation_id)
        refused_polls = [r for r in fake.calls("fetchPredictOperation")
                         if r.body["operationName"] == refused_started.provider_operation]
        assert len(refused_polls) == 1
        [last] = reader.of(VideoPolled, refused.operation_id)
        assert last.final and not last.done and "403" in str(last.error_message)
        assert [e.attempt for e in reader.of(VideoPollScheduled, refused.operation_id)] == [1]

        wait_for(lambda: any(e.get("tags", {}).get("request_id") == refused.request_id
                             for e in sentry.received()), 30, "the 403 in Sentry")
        [report] = [e for e in sentry.received()
                    if e.get("tags", {}).get("request_id") == refused.request_id]
        assert report["tags"]["client_id"] == "globex"
        assert "test-api-key" not in str(report) and "test-access-token" not in str(report)
    finally:
        reader.close()
        worker.stop()
    log = worker.log_path.read_text()
    assert "test-api-key" not in log and "test-access-token" not in log


def test_the_breaker_opens_fails_fast_and_closes_when_the_provider_recovers(
    settings: Settings, fake: FakeGemini
) -> None:
    cooldown = 1.5
    settings = gemini_settings(
        settings, fake, breaker_failure_threshold=3, breaker_window_seconds=60,
        breaker_cooldown_seconds=cooldown, provider_retry_attempts=2,
        generation_max_in_flight=1,  # one call at a time, so the count of calls is exact
    )
    prepare_topics(settings)
    reader = TopicReader(settings, settings.topics.providers, settings.topics.completed)
    worker = WorkerProcess(settings, "all").start()
    try:
        fake.take_down("generateContent", 503)
        failing = [request("text_generation", TEXT, max_output_tokens=64) for _ in range(4)]
        produce(settings, settings.topics.admitted, failing)
        reader.until("four failed operations",
                     lambda _: len(reader.of(OperationCompleted)) == 4, 120)

        # 2 attempts of the first, 1 of the second open the circuit; the rest fail fast
        assert len(fake.calls("generateContent")) == 3
        outcome = {e.operation_id: e for e in reader.of(OperationCompleted)}
        first = outcome[failing[0].operation_id]
        assert not first.success and first.metadata["reason"] == "retries_exhausted"
        for r in failing[1:]:
            assert not outcome[r.operation_id].success
            assert outcome[r.operation_id].error_message == "provider_unavailable"
        [opened] = [e for e in reader.events if isinstance(e, ProviderCircuitOpened)]
        assert (opened.provider, opened.model, opened.failures) == ("gemini", TEXT, 3)

        fake.recover("generateContent")
        wait_for(lambda: utcnow() > opened.occurred_at + timedelta(seconds=cooldown),
                 10, "the cool-down", interval=0.05)
        healthy = request("text_generation", TEXT, max_output_tokens=64)
        produce(settings, settings.topics.admitted, [healthy])
        reader.until("the circuit closed", lambda events: any(
            isinstance(e, ProviderCircuitClosed) for e in events), 60)
        reader.until("the healthy operation",
                     lambda _: bool(reader.of(OperationCompleted, healthy.operation_id)), 60)
        [ok] = reader.of(OperationCompleted, healthy.operation_id)
        assert ok.success and ok.usage.output_tokens == fake.text_tokens
        assert len(fake.calls("generateContent")) == 4
        [closed] = [e for e in reader.events if isinstance(e, ProviderCircuitClosed)]
        assert closed.model == TEXT and closed.open_seconds >= cooldown
    finally:
        reader.close()
        worker.stop()
    log = worker.log_path.read_text()
    assert '"circuit_opened"' in log and '"circuit_closed"' in log


def test_a_worker_killed_mid_poll_resumes_the_same_operation(
    settings: Settings, fake: FakeGemini
) -> None:
    base, polls = 0.15, 8  # ~7.4 s of waits in all
    settings = gemini_settings(settings, fake, video_poll_base_seconds=base)
    fake.video_polls = polls
    prepare_topics(settings)
    reader = TopicReader(settings, settings.topics.video_polls, settings.topics.completed)
    sink = WorkerProcess(settings, "costs").start()
    streams = WorkerProcess(settings, "streams").start()
    try:
        video = request("video_generation", VEO, duration_seconds=6)
        produce(settings, settings.topics.admitted, [video])
        wait_for(lambda: len(fake.calls("fetchPredictOperation")) >= 3, 120,
                 "three polls", interval=0.02)
        streams.kill()
        assert len(fake.calls("fetchPredictOperation")) < polls, "killed too late"

        streams = WorkerProcess(settings, "streams").start()
        reader.until("the completed event",
                     lambda _: bool(reader.of(OperationCompleted, video.operation_id)), 150)
        store = store_of(settings, sink)
        wait_for(lambda: bool(rows(store, settings.clickhouse_database, video.operation_id)),
                 60, "the cost row")

        assert len(fake.calls("predictLongRunning")) == 1
        [started] = reader.of(VideoStarted, video.operation_id)
        assert {r.body["operationName"] for r in fake.calls("fetchPredictOperation")} == {
            started.provider_operation}
        copies = reader.of(OperationCompleted, video.operation_id)
        [done] = {e.event_id: e for e in copies}.values()  # a re-run emits the same event
        # the poll cut short by the kill may run again: the fake counts it, so the video
        # can be done one attempt early
        assert polls - 1 <= done.poll_count <= polls
        assert_schedule(reader, video.operation_id, done.poll_count, base)
        assert rows(store, settings.clickhouse_database, video.operation_id) == [
            (True, Decimal("2.4"), done.poll_count, Decimal(6), None)]
        total = store.client.query(
            f"SELECT count() FROM {settings.clickhouse_database}.ai_cost_tracking FINAL"
        ).result_rows
        assert total == [(1,)]
    finally:
        reader.close()
        streams.stop()
        sink.stop()

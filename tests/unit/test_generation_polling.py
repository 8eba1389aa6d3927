"""Generation end to end without Kafka: simulated provider, fake clock, pure poll decisions."""

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from aipipe.schemas.events import (
    OperationAdmitted,
    OperationCompleted,
    VideoPolled,
    VideoPollScheduled,
    VideoStarted,
    operation_key,
)
from aipipe.schemas.prices import price_table_at
from aipipe.streams.generation import Generation, SimulatedProvider
from aipipe.streams.generation.backoff import PollSchedule
from aipipe.streams.generation.guard import ProviderGuard
from aipipe.streams.generation.polling import DueVideos, after_poll, pending_after
from aipipe.streams.generation.provider import ProviderError, VideoStatus

T0 = datetime(2026, 11, 26, 12, tzinfo=UTC)
PRICES = price_table_at(T0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def video_request(**params: Any) -> OperationAdmitted:
    return OperationAdmitted(
        request_id="r1", client_id="acme", operation_id="op-1", requested_at=T0,
        operation_type="video_generation", provider="simulated",
        model="veo-3.0-fast-generate-001", params={"prompt": "a cat", **params},
    )


def generation(clock: Clock, schedule: PollSchedule | None = None) -> Generation:
    return Generation({"simulated": SimulatedProvider()}, ProviderGuard(),
                      schedule or PollSchedule(), clock)


def test_a_video_starts_without_waiting_and_finishes_on_the_scripted_poll() -> None:
    clock = Clock()
    gen = generation(clock)
    started, first = asyncio.run(gen.run(video_request(duration_seconds=6,
                                                       simulate={"polls": 3})))
    assert isinstance(started, VideoStarted) and isinstance(first, VideoPollScheduled)
    assert started.provider_operation == "simulated/operations/op-1"
    assert (first.attempt, first.wait_seconds, first.due_at) == (1, 2.0, T0 + timedelta(seconds=2))

    waits, attempt, events = [first.wait_seconds], 1, []
    while True:
        clock.now += timedelta(seconds=waits[-1])
        events = asyncio.run(gen.poll(started, attempt))
        if not isinstance(events[-1], VideoPollScheduled):
            break
        polled, scheduled = events
        assert isinstance(polled, VideoPolled) and not polled.done and not polled.final
        waits.append(scheduled.wait_seconds)
        attempt = scheduled.attempt
    assert waits == [2.0, 3.0, 4.5]
    done, polled = events
    assert isinstance(done, OperationCompleted) and isinstance(polled, VideoPolled)
    assert done.success and done.poll_count == 3 and polled.done and polled.final
    assert done.usage.video_seconds == Decimal(6) and done.cost_usd == Decimal("0.9")
    assert polled.elapsed_seconds == 9.5


def test_a_permanent_poll_error_fails_the_operation_once_and_stops_polling() -> None:
    started = _started()
    events = after_poll(started, 2, ProviderError.from_status(403, "gemini operations.get: 403"),
                        PollSchedule(), PRICES, T0 + timedelta(seconds=5))
    done, polled = events
    assert isinstance(done, OperationCompleted) and not done.success
    assert done.metadata["reason"] == "provider_error" and done.cost_usd == 0
    assert isinstance(polled, VideoPolled) and polled.final and "403" in str(polled.error_message)


def test_a_transient_poll_error_schedules_the_next_poll() -> None:
    events = after_poll(_started(), 1, ProviderError.from_status(503, "busy"), PollSchedule(),
                        PRICES, T0)
    assert [type(e) for e in events] == [VideoPolled, VideoPollScheduled]


def test_polling_gives_up_past_the_maximum_total_wait_with_the_reason() -> None:
    schedule = PollSchedule(max_total=8.0)  # 2 + 3 = 5; + 4.5 > 8
    events = after_poll(_started(), 2, VideoStatus(done=False), schedule, PRICES, T0)
    done = events[0]
    assert isinstance(done, OperationCompleted) and not done.success
    assert done.metadata["reason"] == "video_timeout" and "maximum of 8 s" in str(
        done.error_message)
    assert isinstance(events[1], VideoPolled) and events[1].final


def test_the_pending_entry_follows_the_polls_topic() -> None:
    started = _started()
    table: dict[str, Any] = {}
    scheduled = after_poll(started, 1, VideoStatus(done=False), PollSchedule(), PRICES, T0)[1]
    for event in (started, scheduled, started, scheduled):  # re-run copies change nothing
        key, change = pending_after(table.get, event, 2)
        if change is not None:
            table[key] = change
    key = operation_key("acme", "op-1")
    assert list(table) == [key]
    assert table[key]["attempt"] == 2 and table[key]["partition"] == 2

    due = DueVideos()
    later = T0 + timedelta(hours=1)
    assert due.take(table, {0, 1}, later) == []  # not this worker's partition
    assert [a for _, a in due.take(table, {2}, later)] == [2]
    assert due.take(table, {2}, later) == []  # once per attempt
    final = after_poll(started, 2, VideoStatus(done=True), PollSchedule(), PRICES, T0)[1]
    assert pending_after(table.get, final, 2) == (key, "delete")


def test_an_entry_under_the_id_alone_is_its_own_clients_only() -> None:
    """Entries written before keys carried the client are found for that client; another
    client's video with the same operation id gets an entry of its own."""
    started = _started()
    scheduled = after_poll(started, 1, VideoStatus(done=False), PollSchedule(), PRICES, T0)[1]
    legacy = pending_after({}.get, started, 2)[1]
    table: dict[str, Any] = {"op-1": legacy}
    assert pending_after(table.get, scheduled, 2)[0] == "op-1"  # updated where it is

    twin = started.model_copy(update={"client_id": "twin"})
    key, change = pending_after(table.get, twin, 3)
    assert key == operation_key("twin", "op-1")
    assert isinstance(change, dict) and change["video"]["client_id"] == "twin"


class _Counted(dict[str, Any]):
    """A table that counts how often it is read whole."""

    scans = 0

    def items(self) -> Any:
        self.scans += 1
        return super().items()


def test_a_tick_reads_only_what_is_due_and_the_whole_table_after_a_change() -> None:
    """Polls come off a heap fed as the table is written; the table is read whole only at
    the start, after a rebalance (``rescan``) or when the partitions change."""
    def entry(n: int, partition: int, attempt: int, due_in: float) -> dict[str, Any]:
        video = _started().model_copy(update={"operation_id": f"op-{n}"})
        return {"video": video.model_dump(mode="json"), "attempt": attempt,
                "due_at": (T0 + timedelta(seconds=due_in)).isoformat(), "partition": partition}

    table, due = _Counted(), DueVideos()
    table.update({f"k{n}": entry(n, 0, 1, n) for n in range(1000)})  # one due each second
    table["restored"] = entry(5000, 1, 3, 0)  # written by the changelog, partition 1
    ran = [v.operation_id for v, _ in due.take(table, {0}, T0 + timedelta(seconds=2.5))]
    assert ran == ["op-0", "op-1", "op-2"] and table.scans == 1

    table["new"] = entry(7000, 0, 1, 1.5)  # written by the polls agent
    due.scheduled("new", table["new"])
    table["k3"] = entry(3, 0, 2, 60)  # polled, rescheduled for later
    due.scheduled("k3", table["k3"])
    del table["k4"]  # done
    due.forget("k4")
    ran = [v.operation_id for v, _ in due.take(table, {0}, T0 + timedelta(seconds=5.5))]
    assert ran == ["op-7000", "op-5"] and table.scans == 1

    ran = [v.operation_id for v, _ in due.take(table, {0, 1}, T0 + timedelta(seconds=6.5))]
    assert ran == ["op-5000", "op-6"] and table.scans == 2  # partition 1 is ours now
    due.rescan()
    assert due.take(table, {0, 1}, T0 + timedelta(seconds=6.5)) == [] and table.scans == 3
    ran = [(v.operation_id, a) for v, a in due.take(table, {0, 1}, T0 + timedelta(seconds=61))]
    assert ran[:3] == [("op-7", 1), ("op-8", 1), ("op-9", 1)] and ("op-3", 2) in ran


def _started() -> VideoStarted:
    return VideoStarted(request_id="r1", client_id="acme", operation_id="op-1", requested_at=T0,
                        provider="gemini", model="veo-3.0-generate-001",
                        provider_operation="projects/p/operations/1", occurred_at=T0)


def test_a_video_started_by_a_second_attempt_completes_as_that_attempt() -> None:
    """A re-run after a crash starts its video as attempt 2; the completion, which comes
    from the polls, says so (it said 1, and `attempt > 1` missed re-run videos)."""
    started = _started().model_copy(update={"attempt": 2})
    [done, _] = after_poll(started, 3, VideoStatus(done=True), PollSchedule(), PRICES, T0)
    assert isinstance(done, OperationCompleted) and done.attempt == 2
    [first, _] = after_poll(_started(), 3, VideoStatus(done=True), PollSchedule(), PRICES, T0)
    assert isinstance(first, OperationCompleted) and first.attempt == 1

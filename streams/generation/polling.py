"""Video polling decisions, pure: what to emit after starting a video and after each poll.

A started video gets ``video.poll_scheduled`` for attempt 1 (wait ``schedule.wait(1)``).
Each poll emits ``video.polled``, then either the next ``video.poll_scheduled`` or the
``operation.completed`` (done, failed, or given up after the maximum total wait). The
completed event comes before the final ``video.polled`` so that a crash between the two
leaves the video pending and the next poll emits the same completed event again (same
``event_id``: the cost sink counts it once).

Pending videos live in a changelog-backed table keyed by the client and the operation id
(``pending_entry``), written only by the agent that reads the polls topic
(``pending_after``); a timer asks ``DueVideos`` which are due and runs them as tasks, so no
wait ever holds up a partition.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Literal

from aipipe.schemas.events import (
    AnyEvent,
    Event,
    VideoPolled,
    VideoPollScheduled,
    VideoStarted,
    operation_event_id,
    operation_key,
)
from aipipe.schemas.prices import PriceTable
from aipipe.streams.generation.backoff import PollSchedule
from aipipe.streams.generation.complete import completed, cut, failed
from aipipe.streams.generation.provider import ProviderError, ProviderResult, VideoStatus

VIDEO_TIMEOUT = "video_timeout"


def schedule_poll(
    started: VideoStarted, attempt: int, schedule: PollSchedule, now: datetime
) -> VideoPollScheduled:
    wait = schedule.wait(attempt)
    return VideoPollScheduled(
        **started.envelope(operation_event_id(started.client_id, started.operation_id,
                                            f"poll-scheduled-{attempt}")),
        occurred_at=now,
        operation_id=started.operation_id,
        provider_operation=started.provider_operation,
        attempt=attempt,
        wait_seconds=wait,
        due_at=now + timedelta(seconds=wait),
    )


def after_poll(
    started: VideoStarted,
    attempt: int,
    outcome: VideoStatus | ProviderError,
    schedule: PollSchedule,
    prices: PriceTable,
    now: datetime,
) -> list[Event]:
    """The events that follow poll ``attempt`` of ``started`` with this ``outcome``."""
    elapsed = max(0.0, (now - started.occurred_at).total_seconds())
    duration_ms = round(elapsed * 1000)
    error = cut(str(outcome) if isinstance(outcome, ProviderError) else outcome.error_message)
    done = isinstance(outcome, VideoStatus) and outcome.done

    def polled(final: bool) -> VideoPolled:
        return VideoPolled(
            **started.envelope(operation_event_id(started.client_id, started.operation_id,
                                                f"polled-{attempt}")),
            occurred_at=now,
            operation_id=started.operation_id,
            provider_operation=started.provider_operation,
            attempt=attempt,
            done=done,
            elapsed_seconds=elapsed,
            error_message=error,
            final=final,
        )

    def finish(result: ProviderResult) -> list[Event]:
        if started.fallback is not None:
            result = replace(result, metadata={**result.metadata, "fallback": started.fallback})
        done = completed(started, result, prices, duration_ms, now, poll_count=attempt)
        return [done.model_copy(update={"attempt": started.attempt}), polled(final=True)]

    if isinstance(outcome, VideoStatus) and outcome.done:
        if outcome.error_message is None:
            return finish(ProviderResult(success=True, usage=outcome.usage,
                                         metadata=outcome.metadata, outputs=outcome.outputs))
        return finish(failed("video_failed", outcome.error_message))
    if isinstance(outcome, ProviderError) and not outcome.retryable:
        return finish(failed("provider_error", str(outcome), status=outcome.status))
    if schedule.gives_up_before(attempt + 1):
        message = (
            f"video not done after {attempt} polls: the next wait would take the scheduled "
            f"total past the maximum of {schedule.max_total:g} s (AIPIPE_VIDEO_MAX_WAIT_SECONDS)"
        )
        return finish(failed(VIDEO_TIMEOUT, message))
    return [polled(final=False), schedule_poll(started, attempt + 1, schedule, now)]


Pending = dict[str, Any]  # {"video": VideoStarted as JSON, "attempt", "due_at", "partition"}
Change = Pending | Literal["delete", "misrouted"] | None


def pending_entry(
    lookup: Callable[[str], Pending | None], video: VideoStarted | VideoPollScheduled | VideoPolled
) -> tuple[str, Pending | None]:
    """The key of ``video``'s entry in ``pending-videos`` (``operation_key``), and the entry.

    An entry written before keys carried the client is under the operation id alone; it
    is found there only when it is the same client's.
    """
    key = operation_key(video.client_id, video.operation_id)
    entry = lookup(key)
    if entry is None:
        legacy = lookup(video.operation_id)
        if legacy is not None and legacy["video"].get("client_id") == video.client_id:
            return video.operation_id, legacy
    return key, entry


def pending_after(
    lookup: Callable[[str], Pending | None], event: AnyEvent, partition: int
) -> tuple[str, Change]:
    """The entry's key and how this event on the polls topic changes its pending entry."""
    if not isinstance(event, VideoStarted | VideoPollScheduled | VideoPolled):
        return "", "misrouted"
    key, entry = pending_entry(lookup, event)
    return key, _change(entry, event, partition)


def _change(
    entry: Pending | None, event: VideoStarted | VideoPollScheduled | VideoPolled, partition: int
) -> Change:
    if isinstance(event, VideoStarted):
        if entry is not None:
            return None
        video = event.model_dump(mode="json")
        return {"video": video, "attempt": 0, "due_at": None, "partition": partition}
    if isinstance(event, VideoPollScheduled):
        if entry is None or event.attempt <= int(entry["attempt"]):
            return None  # a re-run's copy, or a video that is no longer pending
        return {**entry, "attempt": event.attempt, "due_at": event.due_at.isoformat()}
    return "delete" if event.final and entry is not None else None


class DueVideos:
    """Which pending videos this worker polls now; each attempt runs once per worker.

    Due polls come off a heap by due time, fed as the polls agent writes the table
    (``scheduled``), so a tick reads only what is due: scanning every pending video took
    about 0.7 ms per thousand, four times a second. The whole table is read again
    (``rescan``) after a rebalance or a recovery, or when the partitions this worker
    polls change: entries the changelog restored never passed through ``scheduled``.
    """

    def __init__(self, max_in_flight: int = 64) -> None:
        self.max_in_flight = max_in_flight
        self.ran: dict[str, int] = {}  # entry key -> the last attempt started here
        self.tasks: set[asyncio.Future[None]] = set()
        self._heap: list[tuple[datetime, str, int]] = []  # (due at, key, attempt)
        self._partitions: set[int] | None = None  # those of the last scan
        self._scan = True

    def scheduled(self, key: str, entry: Pending) -> None:
        """``entry`` was written under ``key``: its poll, if one is scheduled, will be due."""
        if int(entry["attempt"]) >= 1 and entry.get("due_at"):
            heapq.heappush(self._heap, (datetime.fromisoformat(entry["due_at"]), key,
                                        int(entry["attempt"])))

    def forget(self, key: str) -> None:
        """``key``'s video is no longer pending (its stale heap items are dropped when due)."""
        self.ran.pop(key, None)

    def rescan(self) -> None:
        self._scan = True

    def take(
        self, table: Mapping[str, Pending | None], partitions: set[int], now: datetime
    ) -> list[tuple[VideoStarted, int]]:
        if self._scan or partitions != self._partitions:
            self._scan, self._partitions, self._heap = False, set(partitions), []
            for key, entry in table.items():
                if entry:
                    self.scheduled(key, entry)
            heapq.heapify(self._heap)
            self.ran = {k: a for k, a in self.ran.items() if k in table}
        due: list[tuple[VideoStarted, int]] = []
        while (self._heap and self._heap[0][0] <= now
               and len(self.tasks) + len(due) < self.max_in_flight):
            _, key, attempt = heapq.heappop(self._heap)
            entry = table.get(key)
            if (not entry or int(entry["attempt"]) != attempt
                    or entry["partition"] not in partitions or self.ran.get(key, 0) >= attempt):
                continue  # gone, superseded, another worker's, or started already
            self.ran[key] = attempt
            due.append((VideoStarted.model_validate(entry["video"]), attempt))
        return due

    def spawn(self, poll: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(poll)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

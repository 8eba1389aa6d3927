"""The faust app, built by a factory from settings and its dependencies (no global app).

Agents are thin: decode, skip what was already done, call the pure decision, send.
Topics carry raw bytes so that undecodable input reaches the dead-letter topic with the
reason instead of crashing the worker. faust is at-least-once: every emitted event has a
deterministic ``event_id`` and duplicate inputs are skipped through changelog-backed
tables, so a re-run after a crash repeats nothing downstream.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import faust
import structlog
from faust.streams import _current_event as current_event_var

from infra.logging import bound_event, report_exception
from infra.settings import Settings
from producers.producer import headers_for
from schemas.deadletter import deadletter_headers
from schemas.errors import EventDecodeError
from schemas.events import (
    Event,
    OperationAdmitted,
    OperationCompleted,
    OperationRejected,
    OperationRequested,
    VideoPolled,
    VideoPollScheduled,
    VideoStarted,
    decode,
    encode,
    utcnow,
)
from streams.admission.gate import build_gate
from streams.generation import AIProvider, Generation
from streams.generation.guard import ProviderGuard
from streams.generation.polling import DueVideos, pending_after
from streams.generation.registry import guard_from_settings, poll_schedule, providers_from_settings

log = structlog.get_logger("aipipe.streams")


@dataclass
class StreamDeps:
    providers: Mapping[str, AIProvider]
    clock: Callable[[], datetime] = field(default=utcnow)
    guard: ProviderGuard | None = None  # circuit breakers and retries; from settings if None


def default_deps(settings: Settings) -> StreamDeps:
    return StreamDeps(providers=providers_from_settings(settings))


def create_app(settings: Settings, deps: StreamDeps | None = None) -> faust.App:
    deps = deps or default_deps(settings)
    topics = settings.topics
    app = faust.App(
        f"{settings.topic_prefix}-streams",
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=0.005,  # batch a decision batch's sends (faust's default: 0)
        # a worker that died is replaced after this, not faust's default of 60 s
        broker_session_timeout=settings.worker_session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.worker_session_timeout_seconds / 5),
        datadir=str(settings.home / "faust"),
    )

    def raw_topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, value_serializer="raw")

    requested, admitted = raw_topic(topics.requested), raw_topic(topics.admitted)
    rejected, completed_topic = raw_topic(topics.rejected), raw_topic(topics.completed)
    deadletter = raw_topic(topics.deadletter)
    seen_requests = app.Table("seen-requests", default=bool, partitions=settings.partitions)
    done_operations = app.Table("done-operations", default=bool, partitions=settings.partitions)

    async def emit(topic: Any, event: Event) -> None:
        key, value = event.client_id.encode(), encode(event)
        await topic.send(key=key, value=value, headers=headers_for(event))

    async def dead_letter(message: Any, stage: str, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, EventDecodeError) else str(exc)
        log.warning("event_dead_lettered", stage=stage, reason=reason, topic=message.topic,
                    partition=message.partition, offset=message.offset)
        await deadletter.send(
            key=message.key,
            value=message.value,
            headers=deadletter_headers(
                reason=reason, error=type(exc).__name__, stage=stage, topic=message.topic,
                partition=message.partition, offset=message.offset,
                original=list(message.headers or []),
            ),
        )

    async def decoded(message: Any, stage: str, expected: type[Event]) -> Any:
        try:
            event = decode(message.value)
            if not isinstance(event, expected):
                raise EventDecodeError(
                    f"Field 'event_type' is {event.event_type!r} on {message.topic}, which "
                    f"carries only {expected.model_fields['event_type'].default} events; "
                    "send it to its own topic."
                )
            return event
        except EventDecodeError as exc:
            await dead_letter(message, stage, exc)
            return None

    gate = build_gate(settings)
    budgets_topic = raw_topic(topics.budgets)

    @app.agent(requested, name="admission")
    async def admission(stream: Any) -> None:
        # one limiter round trip per batch (see streams/admission/gate.py)
        size, within = settings.admission_batch_size, settings.admission_batch_seconds
        async for batch in stream.take_events(size, within=within):
            requests, carriers = [], []
            for item in batch:
                request = await decoded(item.message, "admission", OperationRequested)
                if request is not None and not seen_requests[request.event_id]:
                    requests.append(request)
                    carriers.append(item)
            result = await gate.decide(requests)
            for notice in result.notices:
                await emit(budgets_topic, notice)
            for decision, item in zip(result.decisions, carriers, strict=True):
                out = admitted if isinstance(decision, OperationAdmitted) else rejected
                await emit(out, decision)
                if isinstance(decision, OperationRejected) and decision.reason != "rate_limited":
                    log.info("operation_rejected", reason=decision.reason, detail=decision.detail,
                             request_id=decision.request_id, client_id=decision.client_id)
                # a table write goes to the changelog partition of this task's current
                # event; set only the task-local contextvar (stream.current_event belongs
                # to the take() buffer running in the background)
                current_event_var.set(weakref.ref(item))
                seen_requests[decision.operation_id] = True

    generator = Generation(
        deps.providers, deps.guard or guard_from_settings(settings), poll_schedule(settings),
        deps.clock, report_exception,
    )

    @app.agent(admitted, name="generation")
    async def generation(stream: Any) -> None:
        async for item in stream.events():
            operation = await decoded(item.message, "generation", OperationAdmitted)
            if operation is None or done_operations[operation.operation_id]:
                continue
            with bound_event(request_id=operation.request_id, client_id=operation.client_id,
                             event_id=operation.event_id):
                try:
                    # a video only starts here (video.started + first poll_scheduled)
                    events = await generator.run(operation)
                except Exception as exc:  # a provider bug must not stop the partition
                    report_exception(exc, request_id=operation.request_id,
                                     client_id=operation.client_id)
                    await dead_letter(item.message, "generation", exc)
                    continue
                await emit_generated(events)
            # the generation step is done (for a video: started, never started again)
            done_operations[operation.operation_id] = True

    # -- video polling: pending videos in a changelog-backed table, due polls on a timer --
    polls, providers_topic = raw_topic(topics.video_polls), raw_topic(topics.providers)
    pending_videos = app.Table("pending-videos", default=None, partitions=settings.partitions)
    due_videos = DueVideos()

    def topic_for(event: Event) -> Any:
        if isinstance(event, OperationCompleted):
            return completed_topic
        return polls if isinstance(event, VideoStarted | VideoPollScheduled | VideoPolled) \
            else providers_topic

    async def emit_generated(events: list[Event], confirm_completed: bool = False) -> None:
        for event in events:
            if isinstance(event, OperationCompleted):
                sent = await topic_for(event).send(
                    key=event.client_id.encode(), value=encode(event), headers=headers_for(event)
                )
                if confirm_completed:  # acked before the final video.polled that follows
                    await sent
                log.info("ai_operation", operation_type=event.operation_type, model=event.model,
                         provider=event.provider, cost_usd=str(event.cost_usd),
                         duration_ms=event.duration_ms, success=event.success,
                         poll_count=event.poll_count, error=event.error_message)
            else:
                await emit(topic_for(event), event)

    @app.agent(polls, name="video-polls")
    async def video_polls(stream: Any) -> None:
        async for item in stream.events():
            try:
                event = decode(item.message.value)
            except EventDecodeError as exc:
                await dead_letter(item.message, "video-polls", exc)
                continue
            operation_id, entry = pending_after(pending_videos.get, event, item.message.partition)
            if entry == "misrouted":
                await dead_letter(item.message, "video-polls", EventDecodeError(
                    f"Field 'event_type' is {event.event_type!r} on {item.message.topic}, "
                    "which carries only video.* events; send it to its own topic."))
            elif entry == "delete":
                pending_videos.pop(operation_id, None)
            elif entry is not None:
                pending_videos[operation_id] = entry

    async def poll_once(video: VideoStarted, attempt: int) -> None:
        with bound_event(request_id=video.request_id, client_id=video.client_id,
                         operation_id=video.operation_id, attempt=attempt):
            try:
                await emit_generated(await generator.poll(video, attempt), confirm_completed=True)
            except Exception as exc:  # a bug: logged and reported, retried after a restart
                log.exception("video_poll_failed", error=str(exc))
                report_exception(exc, request_id=video.request_id, client_id=video.client_id)

    async def run_due_polls() -> None:
        if app.rebalancing or app.in_recovery:
            return
        actives = {tp.partition for tp in app.assignor.assigned_actives()
                   if tp.topic == topics.video_polls}
        for video, attempt in due_videos.take(pending_videos.items(), actives, deps.clock()):
            due_videos.spawn(poll_once(video, attempt))

    app.timer(interval=settings.video_poll_tick_seconds, name="video-poll-timer")(run_due_polls)

    return app

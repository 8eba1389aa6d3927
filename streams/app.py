"""The faust app, built by a factory from settings and its dependencies (no global app).

Agents are thin: decode, skip what was already done, call the pure decision, send.
Topics carry raw bytes so that undecodable input reaches the dead-letter topic with the
reason instead of crashing the worker. faust is at-least-once: every emitted event has a
deterministic ``event_id`` and duplicate inputs are skipped through changelog-backed
tables, so a re-run after a crash repeats nothing downstream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import faust
import structlog

from infra.logging import bound_event, report_exception
from infra.settings import Settings
from producers.producer import headers_for
from schemas.deadletter import deadletter_headers
from schemas.errors import EventDecodeError
from schemas.events import (
    Event,
    OperationAdmitted,
    OperationRejected,
    OperationRequested,
    decode,
    encode,
    utcnow,
)
from schemas.prices import price_table_at
from streams.admission import decide
from streams.generation import AIProvider, SimulatedProvider, completed

log = structlog.get_logger("aipipe.streams")


@dataclass
class StreamDeps:
    provider: AIProvider
    clock: Callable[[], datetime] = field(default=utcnow)


def default_deps(settings: Settings) -> StreamDeps:
    return StreamDeps(provider=SimulatedProvider(latency_ms=settings.simulated_latency_ms))


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

    @app.agent(requested, name="admission")
    async def admission(stream: Any) -> None:
        async for item in stream.events():
            request = await decoded(item.message, "admission", OperationRequested)
            if request is None or seen_requests[request.event_id]:
                continue
            with bound_event(request_id=request.request_id, client_id=request.client_id,
                             event_id=request.event_id):
                decision = decide(request, price_table_at(request.occurred_at))
                out = admitted if isinstance(decision, OperationAdmitted) else rejected
                await emit(out, decision)
                if isinstance(decision, OperationRejected):
                    log.info("operation_rejected", reason=decision.reason, detail=decision.detail)
            seen_requests[request.event_id] = True

    @app.agent(admitted, name="generation")
    async def generation(stream: Any) -> None:
        async for item in stream.events():
            operation = await decoded(item.message, "generation", OperationAdmitted)
            if operation is None or done_operations[operation.operation_id]:
                continue
            with bound_event(request_id=operation.request_id, client_id=operation.client_id,
                             event_id=operation.event_id):
                started = time.perf_counter()
                try:
                    result = await deps.provider.generate(operation)
                except Exception as exc:  # a provider bug must not stop the partition
                    report_exception(exc, request_id=operation.request_id,
                                     client_id=operation.client_id)
                    await dead_letter(item.message, "generation", exc)
                    continue
                duration_ms = round((time.perf_counter() - started) * 1000)
                event = completed(operation, result, price_table_at(operation.requested_at),
                                  duration_ms, deps.clock())
                await emit(completed_topic, event)
                log.info("ai_operation", operation_type=event.operation_type, model=event.model,
                         provider=event.provider, cost_usd=str(event.cost_usd),
                         duration_ms=duration_ms, success=event.success)
            done_operations[operation.operation_id] = True

    return app

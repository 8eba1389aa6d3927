"""The faust app, built by a factory from settings and its dependencies (no global app).

Agents are thin: decode, skip what was already done, call the pure decision, send.
Topics carry raw bytes so that undecodable input reaches the dead-letter topic with the
reason instead of crashing the worker. faust is at-least-once: every emitted event has a
deterministic ``event_id`` and duplicate inputs are skipped through changelog-backed
tables, so a re-run after a crash repeats nothing downstream.

Admission and generation run in the pipeline's own tasks fed by their agents
(``aipipe.streams.intake``): an event is acknowledged only after the events it caused are sent,
and faust's consumer never counts a message no agent handled
(``aipipe.streams.consumer``), so neither an error nor a rebalance commits past an event that
was not handled. Every error policy is explicit: what cannot be decoded is dead-lettered,
what cannot be decided is rejected as ``invalid``, what fails in generation is a failed
completion, and a failure to send (or a bug outside those) takes the process down
(``supervised``) before anything more is acknowledged, so a supervisor's restart
repeats the unfinished work.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import faust
import structlog

from aipipe.consumers.costs.budgets import BudgetStore
from aipipe.infra import metrics
from aipipe.infra.kafka_auth import broker_credentials
from aipipe.infra.logging import bound_event, exit_process, report_exception
from aipipe.infra.metrics import HEALTH, LagGauge
from aipipe.infra.settings import Settings
from aipipe.producers import tracing
from aipipe.producers.producer import headers_for
from aipipe.schemas.deadletter import build_dead_letter
from aipipe.schemas.errors import EventDecodeError, StaleOperationError
from aipipe.schemas.events import (
    Event,
    OperationAdmitted,
    OperationCompleted,
    OperationInterrupted,
    OperationRejected,
    OperationRequested,
    VideoPolled,
    VideoPollScheduled,
    VideoStarted,
    decode,
    encode,
    operation_event_id,
    operation_key,
    utcnow,
)
from aipipe.streams import dedup, spans
from aipipe.streams.admission.decide import undecidable
from aipipe.streams.admission.gate import AdmissionGate, Decided, build_gate
from aipipe.streams.consumer import stand_in_reason, use_safe_seek_consumer
from aipipe.streams.faults import StallPoints
from aipipe.streams.generation import AIProvider, Generation
from aipipe.streams.generation.guard import ProviderGuard
from aipipe.streams.generation.polling import DueVideos, pending_after
from aipipe.streams.generation.registry import (
    guard_from_settings,
    poll_schedule,
    providers_from_settings,
)
from aipipe.streams.intake import Intake, acknowledge

log = structlog.get_logger("aipipe.streams")
MAX_POLL_RECORDS = 500  # records per fetch handed to the agents (create_app says why)


@dataclass
class StreamDeps:
    providers: Mapping[str, AIProvider]
    # opens the read-only store admission reads budgets and spend from (None: not now)
    open_budget_store: Callable[[], BudgetStore | None]
    clock: Callable[[], datetime] = field(default=utcnow)
    guard: ProviderGuard | None = None  # circuit breakers and retries; from settings if None


def default_deps(
    settings: Settings, open_budget_store: Callable[[], BudgetStore | None]
) -> StreamDeps:
    return StreamDeps(providers=providers_from_settings(settings),
                      open_budget_store=open_budget_store)


async def remember(table: Any, event: Any, key: str, value: Any) -> Awaitable[Any]:
    """Set ``key`` in ``table``, its changelog record sent on ``event``'s partition.

    faust sends a table write's changelog record through its producer buffer, one
    message at a time for every table of the worker; with hundreds of operations in
    flight, the generation stage waited there for seconds per operation. This hands the
    record straight to the producer (as ``emit`` does), serialized as faust would. The
    returned future resolves when the broker has the record; faust flushes the producer
    before it commits an offset, so a write whose future is not awaited is as durable as
    faust's own.
    """
    table.data[key] = value
    changelog = table.changelog_topic
    wire_key, _ = changelog.prepare_key(key, table.key_serializer)
    wire_value, _ = changelog.prepare_value(value, table.value_serializer)
    return await table.app.producer.send(  # type: ignore[no-any-return]
        changelog.get_topic_name(), wire_key, wire_value, event.message.partition, None, None)


def create_app(settings: Settings, deps: StreamDeps) -> faust.App:
    topics = settings.topics
    group = f"{settings.topic_prefix}-streams"
    app = faust.App(
        group,
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=broker_credentials(settings),  # SASL sign-in, or None
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor or 1,  # runner: the cluster's
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=0.005,  # batch a decision batch's sends (faust's default: 0)
        producer_max_batch_size=1_048_576,  # per partition (aiokafka's default: 16 kB)
        # records per fetch handed to the agents (faust's default: all the fetcher holds).
        # Unbounded, one fetch of a requests backlog (thousands of records) went to
        # admission one by one, each waiting for room in its full stream buffer, while the
        # admitted records behind them waited: in a 20,000-request burst, generation got
        # its first event 8 s after admission began. At 500 (aiokafka's own default) the
        # stages overlap and the first completion comes within 2 s.
        broker_max_poll_records=MAX_POLL_RECORDS,
        # a worker that died is replaced after this, not faust's default of 60 s
        broker_session_timeout=settings.worker_session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.worker_session_timeout_seconds / 5),
        datadir=str(settings.home / "faust"),
    )
    use_safe_seek_consumer(app)

    def raw_topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, value_serializer="raw")

    requested, admitted = raw_topic(topics.requested), raw_topic(topics.admitted)
    rejected, completed_topic = raw_topic(topics.rejected), raw_topic(topics.completed)
    deadletter = raw_topic(topics.deadletter)
    # dedup state, remembered for the horizon (values carry their time: streams/dedup.py)
    horizon = settings.dedup_horizon_hours * 3600

    def dedup_table(name: str) -> Any:
        return app.Table(name, default=None, partitions=settings.partitions,
                         extra_topic_configs=dedup.changelog_config(horizon))

    seen_requests, done_operations = dedup_table("seen-requests"), dedup_table("done-operations")
    # the last attempt of the generation step started per operation (see begin_attempt)
    started_operations = dedup_table("started-operations")

    def recall(table: Any, key: str, legacy: str) -> Any:
        """``table``'s value for ``key`` (``operation_key``), or for the id alone: ``legacy``
        keys were written before keys carried the client, and expire with the horizon."""
        value = table.get(key)
        return table.get(legacy) if value is None else value

    def remembered(table: Any, key: str, legacy: str) -> bool:
        return dedup.is_fresh(recall(table, key, legacy), deps.clock().timestamp(), horizon)

    async def emit(topic: Any, event: Event, stage: str, span: Any = None) -> Awaitable[Any]:
        """Send ``event`` (with the trace context of ``span``, or the current span's); the
        returned future resolves when the broker has it.

        The record goes straight to faust's producer (the one whose flush precedes every
        commit), not through ``Topic.send``: that wraps each record in a pending message
        and a future with sensor calls and a callback, about 7 % of a busy streams
        worker's time."""
        key, value = event.client_id.encode(), encode(event)
        sent = await app.producer.send(topic.get_topic_name(), key, value, None, None,
                                       headers_for(event, span))  # type: ignore[arg-type]
        metrics.EVENTS_PRODUCED.labels(stage, getattr(event, "event_type", "")).inc()
        return sent

    async def dead_letter(message: Any, stage: str, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, EventDecodeError) else str(exc)
        log.warning("event_dead_lettered", stage=stage, reason=reason, topic=message.topic,
                    partition=message.partition, offset=message.offset)
        metrics.DEAD_LETTERS.labels(stage).inc()
        letter = build_dead_letter(
            message.key, message.value, message.headers, reason=reason,
            error=type(exc).__name__, stage=stage, topic=message.topic,
            partition=message.partition, offset=message.offset)
        await deadletter.send(key=letter.key, value=letter.value, headers=letter.headers)

    async def decoded(message: Any, stage: str, expected: type[Event]) -> Any:
        """The event of ``message``, or None after dead-lettering what cannot be decoded."""
        try:
            if message.value is None and (reason := stand_in_reason(
                    message.topic, message.partition, message.offset)) is not None:
                raise EventDecodeError(reason)  # a stand-in (streams.consumer)
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
        except Exception as exc:  # anything a hostile payload can raise
            await dead_letter(message, stage, EventDecodeError(
                f"The message could not be decoded ({type(exc).__name__}); send a JSON "
                "event that matches the published schema."))
        return None

    gate = build_gate(settings, deps.open_budget_store)
    budgets_topic = raw_topic(topics.budgets)
    admission_intake = Intake(maxsize=settings.admission_batch_size * 4, name="admission-agent")
    faults = StallPoints(settings.fault)

    @app.agent(requested, name="admission")
    async def admission(stream: Any) -> None:
        await admission_intake.feed(stream)

    async def admit(events: list[Any]) -> None:
        """Decide one batch: every request that decodes gets exactly one decision."""
        metrics.EVENTS_CONSUMED.labels("admission").inc(len(events))
        await faults.reached("admission_stall")
        requests, carriers, repeats = [], [], []
        batched: set[str] = set()
        for event in events:
            request = await decoded(event.message, "admission", OperationRequested)
            if request is None:
                acknowledge(event)
                continue
            key = operation_key(request.client_id, request.event_id)
            if remembered(seen_requests, key, request.event_id):
                acknowledge(event)
            elif key in batched:
                # the same request again in this batch, not marked seen yet: a record
                # fetched twice (faust's start-up resumes the stream partitions, with the
                # fetcher running for the table recovery, before it seeks them to their
                # committed offsets), or one sent twice at once. Decided once, with the
                # first; acknowledged once that decision is on the broker
                repeats.append(event)
            else:
                batched.add(key)
                requests.append(request)
                carriers.append(event)
        if not requests:
            return
        traced = spans.admission(requests, carriers) if tracing.enabled else None
        result = await decide_each_once(gate, requests, deps.clock)
        for notice in result.notices:
            await emit(budgets_topic, notice, "admission")
            metrics.BUDGET_THRESHOLDS.labels(str(notice.threshold_percent)).inc()
        sent = []
        for decision in result.decisions:
            out = admitted if isinstance(decision, OperationAdmitted) else rejected
            span = traced.get(operation_key(decision.client_id, decision.operation_id)) \
                if traced else None
            sent.append(await emit(out, decision, "admission", span))
            metrics.DECISIONS.labels(
                "admitted" if out is admitted else "rejected",
                decision.reason if isinstance(decision, OperationRejected) else "admitted",
                decision.backend).inc()
            if isinstance(decision, OperationRejected) and decision.reason != "rate_limited":
                log.info("operation_rejected", reason=decision.reason, detail=decision.detail,
                         request_id=decision.request_id, client_id=decision.client_id)
        # Only a decision the broker has may mark its request seen: the changelog write
        # and the decision go to different partitions, and a crash between the two must
        # not leave a request marked seen whose decision was lost.
        await asyncio.gather(*sent)
        if traced:
            spans.decided(traced, result.decisions)
        marked = dedup.mark(deps.clock().timestamp())
        for decision, event in zip(result.decisions, carriers, strict=True):
            await remember(seen_requests, event,
                           operation_key(decision.client_id, decision.operation_id), marked)
            acknowledge(event)
        for event in repeats:
            acknowledge(event)

    async def admission_loop() -> None:
        # one limiter round trip per batch (see streams/admission/gate.py)
        size, within = settings.admission_batch_size, settings.admission_batch_seconds
        while True:
            HEALTH.idle("admission")
            events = await admission_intake.batch(size, within)
            with HEALTH.working("admission"):
                await admit(events)

    generator = Generation(
        deps.providers, deps.guard or guard_from_settings(settings), poll_schedule(settings),
        deps.clock, report_exception, fallback_slot=gate.fallback_slot,
        param_limits=gate.rules.params,
    )
    in_flight = settings.generation_max_in_flight
    generation_intake = Intake(maxsize=in_flight, name="generation-agent")

    @app.agent(admitted, name="generation")
    async def generation(stream: Any) -> None:
        await generation_intake.feed(stream)

    async def announce_interrupted(operation: OperationAdmitted, key: str) -> int:
        """The last attempt recorded for ``operation`` (0: none); one that was recorded is
        announced with ``operation.interrupted``, since it never finished."""
        before = dedup.attempt_of(recall(started_operations, key, operation.operation_id),
                                  deps.clock().timestamp(), horizon)
        if before:
            log.warning("operation_interrupted", attempt=before, provider=operation.provider,
                        model=operation.model)
            await emit(providers_topic, OperationInterrupted(
                **operation.envelope(
                    operation_event_id(operation.client_id, operation.operation_id,
                                       f"interrupted-{before}")),
                occurred_at=deps.clock(), operation_id=operation.operation_id,
                operation_type=operation.operation_type, provider=operation.provider,
                model=operation.model, attempt=before,
                reason="The worker stopped during this attempt; the provider may have done "
                       "and billed it, and only the attempt that completes is costed.",
            ), "generation")
        return before

    async def begin_attempt(event: Any, operation: OperationAdmitted, key: str) -> int:
        """Record that an attempt starts, durably, before the provider is called.

        An attempt recorded and never finished was interrupted (the worker stopped during
        the call, which the provider may have billed): it is announced with
        ``operation.interrupted`` before the next attempt starts.
        """
        before = await announce_interrupted(operation, key)
        attempt = before + 1
        value = dedup.attempt_mark(attempt, deps.clock().timestamp())
        # on the broker before the call: a crash during the call must find this record
        await (await remember(started_operations, event, key, value))
        return attempt

    running_operations: dict[str, asyncio.Future[None]] = {}

    async def generate(event: Any) -> None:
        """Run one admitted operation: exactly one completion (or its video's first poll).

        A second delivery of an operation this worker is running (a seek back after a
        rebalance fetches it again) waits for the run in progress instead of starting
        another attempt.
        """
        metrics.EVENTS_CONSUMED.labels("generation").inc()
        operation = await decoded(event.message, "generation", OperationAdmitted)
        if operation is not None:
            await generate_once(event, operation,
                                operation_key(operation.client_id, operation.operation_id))
        acknowledge(event)

    async def generate_once(event: Any, operation: OperationAdmitted, key: str) -> None:
        if key in running_operations:
            await asyncio.shield(running_operations[key])
        elif remembered(done_operations, key, operation.operation_id):
            pass
        elif (stale := dedup.stale_operation(operation.requested_at, deps.clock(), horizon,
                                             settings.clock_skew_seconds)) is not None:
            # not run again; an attempt started within the horizon and never finished is
            # still announced, as a re-run would have
            await announce_interrupted(operation, key)
            await dead_letter(event.message, "generation", StaleOperationError(stale))
        else:
            running = running_operations[key] = asyncio.get_running_loop().create_future()
            metrics.OPERATIONS_IN_FLIGHT.inc()
            try:
                await run_operation(event, operation, key)
            finally:
                metrics.OPERATIONS_IN_FLIGHT.dec()
                del running_operations[key]
                running.set_result(None)

    async def run_operation(event: Any, operation: OperationAdmitted, key: str) -> None:
        """One attempt at ``operation``: its events on the broker, then its done mark."""
        with bound_event(request_id=operation.request_id, client_id=operation.client_id,
                         event_id=operation.event_id), spans.generation(event.message, operation):
            attempt = await begin_attempt(event, operation, key)
            # never raises for the operation: a failure is a failed completion
            events = [e.model_copy(update={"attempt": attempt})
                      if isinstance(e, OperationCompleted | VideoStarted) else e
                      for e in await generator.run(operation)]
            sent = await emit_generated(events, "generation")
            # done only once the broker has its events (see admit)
            await asyncio.gather(*sent)
        # the generation step is done (for a video: started, never started again)
        await remember(done_operations, event, key, dedup.mark(deps.clock().timestamp()))

    async def generation_loop() -> None:
        # up to ``in_flight`` operations at once, from every partition this worker holds:
        # a slow one never holds back the others, and faust commits a partition only up to
        # its first operation still running, so a crash re-runs at most those in flight
        slots = asyncio.Semaphore(in_flight)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                exit_process("generation", task.exception())  # type: ignore[arg-type]

        while True:
            HEALTH.idle("generation")
            event = await generation_intake.one()
            with HEALTH.working("generation"):  # waits for a slot: every one may be stuck
                await slots.acquire()
            task = asyncio.ensure_future(generate(event))
            running.add(task)
            task.add_done_callback(finished)

    app.task(supervised("admission", admission_loop))
    app.task(supervised("generation", generation_loop))

    async def purge_dedup() -> None:
        """Drop the dedup keys older than the horizon from memory (not the changelog)."""
        for table in (seen_requests, done_operations, started_operations):
            purged = await dedup.purge(table.data, deps.clock().timestamp(), horizon,
                                       pause=lambda: asyncio.sleep(0))
            metrics.DEDUP_KEYS.labels(table.name).set(purged.kept)
            metrics.DEDUP_EXPIRED.labels(table.name).inc(purged.expired)

    app.timer(interval=dedup.purge_interval(horizon), name="dedup-purge")(
        supervised("dedup-purge", purge_dedup))

    def dump_state() -> None:
        consumer: Any = app.consumer
        recovery: Any = app.tables.recovery  # type: ignore[attr-defined]
        log.warning(
            "worker_state", rebalancing=app.rebalancing, in_recovery=app.in_recovery,
            flow_active=app.flow_control.is_active(), consumer_flow=consumer.flow_active,
            generation=app.consumer_generation_id,
            assignment=sorted(str(tp) for tp in consumer.assignment()),
            paused=sorted(str(tp) for tp in consumer._paused_partitions),
            recovery_remaining={str(k): v for k, v in recovery.active_remaining().items()},
            recovery_completed=recovery.completed.is_set(),
        )
        dump_tasks()

    async def tasks_on_sigusr1() -> None:
        """``kill -USR1 <pid>`` logs what every asyncio task of the worker is waiting on."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_state)

    app.task(tasks_on_sigusr1)

    # -- video polling: pending videos in a changelog-backed table, due polls on a timer --
    polls, providers_topic = raw_topic(topics.video_polls), raw_topic(topics.providers)
    pending_videos = app.Table("pending-videos", default=None, partitions=settings.partitions)
    due_videos = DueVideos()

    def topic_for(event: Event) -> Any:
        if isinstance(event, OperationCompleted):
            return completed_topic
        return polls if isinstance(event, VideoStarted | VideoPollScheduled | VideoPolled) \
            else providers_topic

    async def emit_generated(
        events: list[Event], stage: str, confirm_completed: bool = False
    ) -> list[Awaitable[Any]]:
        """Send ``events`` in order; the futures resolve when the broker has each."""
        sent = []
        for event in events:
            sent.append(await emit(topic_for(event), event, stage))
            if isinstance(event, OperationCompleted):
                if tracing.enabled:  # model, cost and success on the stage's span
                    tracing.note(event)
                metrics.OPERATIONS_COMPLETED.labels(event.operation_type,
                                                    str(event.success).lower()).inc()
                metrics.COST_USD.labels(event.provider, event.model).inc(float(event.cost_usd))
                if problem := event.metadata.get("usage_problem"):
                    metrics.USAGE_PROBLEMS.labels(event.provider, event.model, problem).inc()
                    log.warning("usage_problem", problem=problem, model=event.model,
                                usage=event.usage.model_dump(exclude_none=True),
                                request_id=event.request_id, client_id=event.client_id)
                if confirm_completed:  # acked before the final video.polled that follows
                    await sent[-1]
                log.info("ai_operation", operation_type=event.operation_type, model=event.model,
                         provider=event.provider, cost_usd=str(event.cost_usd),
                         duration_ms=event.duration_ms, success=event.success,
                         poll_count=event.poll_count, error=event.error_message)
        return sent

    async def track_video(item: Any) -> None:
        """Keep ``pending-videos`` in step with one event of the polls topic."""
        metrics.EVENTS_CONSUMED.labels("video-polls").inc()
        event = await decoded(item.message, "video-polls", Event)
        if event is None:
            return
        key, entry = pending_after(pending_videos.get, event, item.message.partition)
        if entry == "misrouted":
            await dead_letter(item.message, "video-polls", EventDecodeError(
                f"Field 'event_type' is {event.event_type!r} on {item.message.topic}, "
                "which carries only video.* events; send it to its own topic."))
        elif entry == "delete":
            pending_videos.pop(key, None)
            due_videos.forget(key)
        elif entry is not None:
            pending_videos[key] = (spans.carry(entry, item.message.headers)
                                   if tracing.enabled else entry)
            due_videos.scheduled(key, entry)

    @app.agent(polls, name="video-polls")
    async def video_polls(stream: Any) -> None:
        try:
            async for item in stream.events():
                await track_video(item)
        except Exception as exc:  # a send or table write failed: stop before it is acked
            exit_process("video-polls", exc)

    async def poll_once(video: VideoStarted, attempt: int) -> None:
        with bound_event(request_id=video.request_id, client_id=video.client_id,
                         operation_id=video.operation_id, attempt=attempt), \
                spans.poll(pending_videos, video, attempt):
            try:
                # never raises for the video: a failure is a failed poll or completion
                events = await generator.poll(video, attempt)
                await emit_generated(events, "video-polls", confirm_completed=True)
            except Exception as exc:  # the events could not be sent
                exit_process("video-poll", exc)

    async def run_due_polls() -> None:
        HEALTH.beat("video-poll-timer")
        metrics.VIDEO_POLLS_PENDING.set(len(pending_videos))
        if app.rebalancing or app.in_recovery:
            due_videos.rescan()  # the table may change under them
            return
        actives = {tp.partition for tp in app.assignor.assigned_actives()
                   if tp.topic == topics.video_polls}
        for video, attempt in due_videos.take(pending_videos, actives, deps.clock()):
            due_videos.spawn(poll_once(video, attempt))

    app.timer(interval=settings.video_poll_tick_seconds, name="video-poll-timer")(
        supervised("video-poll-timer", run_due_polls))

    async def refetch_if_stalled() -> None:
        """Seek back to the committed offsets when a partition has stopped moving.

        A safety net under ``aipipe.streams.consumer``: when a stage (admission or generation)
        has taken nothing in for ``AIPIPE_STALL_REFETCH_SECONDS`` and holds nothing, yet a
        partition of its topic that this worker holds is committed below its high
        watermark, the messages between were fetched and lost on the way to the agent
        (stalls seen after crash restarts).
        Fetching them again is safe: every effect is idempotent by ``event_id``.
        """
        consumer: Any = app.consumer
        HEALTH.beat("stall-refetch")
        if app.rebalancing or app.in_recovery:
            return
        now, wait = time.monotonic(), settings.stall_refetch_seconds
        quiet_topics = []  # a stage that took nothing in for a while and holds nothing
        if now - admission_intake.fed_at >= wait and admission_intake.queue.empty():
            quiet_topics.append(topics.requested)
        if (now - generation_intake.fed_at >= wait and generation_intake.queue.empty()
                and not running_operations):
            quiet_topics.append(topics.admitted)
        watched = [tp for tp in consumer.assignment() if tp.topic in quiet_topics]
        if not watched:
            return
        highs = await consumer.highwaters(*watched)
        behind = {str(tp): (consumer._committed_offset.get(tp), highs.get(tp))
                  for tp in watched
                  if highs.get(tp) is not None
                  and (consumer._committed_offset.get(tp) or 0) < highs[tp]}
        if behind:
            log.warning("partitions_stalled_refetching", partitions=behind)
            await consumer.perform_seek()
            admission_intake.fed_at = generation_intake.fed_at = time.monotonic()

    app.timer(interval=max(1.0, settings.stall_refetch_seconds / 4), name="stall-refetch")(
        supervised("stall-refetch", refetch_if_stalled))

    lag = LagGauge(group)
    sources = {topics.requested, topics.admitted, topics.video_polls}
    HEALTH.set_ready("partitions_assigned", False)
    HEALTH.set_ready("tables_recovered", False)

    async def observe() -> None:
        """Readiness and lag, from the event loop: faust's consumer is not for other threads.

        Ready once this worker holds partitions and its tables are recovered; the lag
        (``aipipe_consumer_lag_messages``) of the source partitions it holds every 5 s.
        """
        HEALTH.beat("observer")
        consumer: Any = app.consumer
        settled = not (app.rebalancing or app.in_recovery)
        held = consumer.assignment()
        HEALTH.set_ready("partitions_assigned", bool(held))
        HEALTH.set_ready("tables_recovered", settled and bool(held)
                         and app.tables.recovery.completed.is_set())  # type: ignore[attr-defined]
        if not settled or time.monotonic() - lag.measured_at < 5.0:
            return
        held = [tp for tp in held if tp.topic in sources]
        highs = await consumer.highwaters(*held) if held else {}
        lag.update({(tp.topic, tp.partition):
                    highs[tp] - (consumer._committed_offset.get(tp) or 0)
                    for tp in held if highs.get(tp) is not None})

    app.timer(interval=1.0, name="observer")(supervised("observer", observe))
    return app


def dump_tasks() -> None:
    for task in asyncio.all_tasks():
        frames: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(frames) < 30:  # follow the chain of awaits
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                frames.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:"
                              f"{frame.f_lineno} {frame.f_code.co_name}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
        log.warning("task_stack", task=task.get_name(), frames=frames)


def supervised(part: str, run: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """``run`` as a faust task or timer that takes the process down when it fails.

    faust would log the error and restart the agent or go on with the timer, with the
    failed work acknowledged or forgotten: a worker that looks alive and is not.
    """

    async def guarded() -> None:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            exit_process(part, exc)

    guarded.__name__ = guarded.__qualname__ = part.replace("-", "_")
    return guarded


async def decide_each_once(
    gate: AdmissionGate, requests: list[OperationRequested], clock: Callable[[], datetime],
) -> Decided:
    """The gate's decisions, one per request, even when deciding the batch raises.

    The gate turns a request it cannot decide into an ``invalid`` rejection. Should the
    batch raise all the same, each request is decided alone, and one that still raises
    is rejected as ``invalid``: its neighbours never pay for it.
    """
    try:
        return await gate.decide(requests, now=clock())
    except Exception as exc:
        log.exception("admission_batch_failed", requests=len(requests), error=str(exc))
        report_exception(exc)
    out = Decided()
    for request in requests:
        try:
            alone = await gate.decide([request], now=clock())
        except Exception as exc:
            out.decisions.append(undecidable(request, clock(), exc))
        else:
            out.decisions += alone.decisions
            out.notices += alone.notices
    return out

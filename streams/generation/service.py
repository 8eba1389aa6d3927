"""Generation as the agents see it: an operation or a due poll in, the events to emit out.

``Generation.run`` handles an admitted operation: images and text in one guarded call,
video by starting it (``video.started`` and the first ``video.poll_scheduled``) without
waiting. ``Generation.poll`` runs one due poll. Both return events in the order to emit
them, circuit transitions included; neither touches Kafka. Provider errors are reported
to Sentry with the request's ids.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

import structlog

from aipipe.schemas.events import (
    Event,
    OperationAdmitted,
    ProviderCircuitClosed,
    ProviderCircuitOpened,
    VideoStarted,
    new_event_id,
    operation_event_id,
    utcnow,
)
from aipipe.schemas.prices import PriceTable, price_table_at
from aipipe.streams.admission.params import ParamLimits, params_problem
from aipipe.streams.artifacts.store import ArtifactStore
from aipipe.streams.generation.backoff import PollSchedule
from aipipe.streams.generation.complete import bounded, completed, failed
from aipipe.streams.generation.guard import (
    PROVIDER_UNAVAILABLE,
    CircuitOpenError,
    Guarded,
    ProviderGuard,
    Transition,
)
from aipipe.streams.generation.outputs import store_result
from aipipe.streams.generation.polling import after_poll, schedule_poll
from aipipe.streams.generation.provider import (
    AIProvider,
    ProviderError,
    ProviderResult,
    VideoJob,
    VideoStatus,
)

T = TypeVar("T")
INTERNAL_ERROR = "internal_error"
MAX_PROVIDER_OPERATION = 2048  # characters of a video's name at its provider, which polls carry
log = structlog.get_logger("aipipe.generation")
Report = Callable[..., None]


def _no_report(exc: BaseException, **tags: str) -> None:
    pass


FallbackSlot = Callable[[OperationAdmitted], Awaitable[bool]]


async def _any_slot(operation: OperationAdmitted) -> bool:
    return True


class Generation:
    def __init__(
        self,
        providers: Mapping[str, AIProvider],
        guard: ProviderGuard,
        schedule: PollSchedule,
        clock: Callable[[], datetime] = utcnow,
        report: Report = _no_report,
        artifacts: ArtifactStore | None = None,
        fallback_slot: FallbackSlot = _any_slot,
        param_limits: ParamLimits | None = None,
    ) -> None:
        """``param_limits``: what admission holds params to (``AIPIPE_PROMPT_MAX_CHARS``
        and the rest), which a fallback's params must meet too."""
        self.providers = providers
        self.param_limits = param_limits or ParamLimits()
        # a slot in the rate limit of the model a fallback runs on (admission took one of
        # the requested model's only): the fallback's own quota holds
        self.fallback_slot = fallback_slot
        self.guard = guard
        self.schedule = schedule
        self.clock = clock
        self.report = report
        # outputs still in bytes are stored here (providers from the registry come wrapped
        # in ``StoringProvider`` and return them stored already)
        self.artifacts = artifacts

    async def run(self, operation: OperationAdmitted) -> list[Event]:
        """The events of one admitted operation; never raises for the operation.

        Anything the provider layer raises besides its own errors (a bug, a value the
        params model let through) ends the operation as a failed completion with reason
        ``internal_error``, reported to Sentry: every admitted operation gets exactly one
        completion, and the worker goes on.
        """
        started = time.perf_counter()
        try:
            return await self._run(operation, started)
        except Exception as exc:
            return [self._internal_failure(operation, exc, started)]

    def _internal_failure(
        self, operation: OperationAdmitted, exc: Exception, started: float
    ) -> Event:
        log.exception("generation_failed", provider=operation.provider, model=operation.model,
                      error=f"{type(exc).__name__}: {exc}")
        self.report(exc, request_id=operation.request_id, client_id=operation.client_id,
                    provider=operation.provider, model=operation.model)
        try:
            prices = price_table_at(operation.requested_at)
        except Exception:  # a time no price table covers: the failure costs nothing anyway
            prices = price_table_at(self.clock())
        result = failed(INTERNAL_ERROR, f"The operation failed inside aipipe "
                        f"({type(exc).__name__}); it was reported and costs nothing.")
        duration_ms = round((time.perf_counter() - started) * 1000)
        return completed(operation, result, prices, duration_ms, self.clock())

    async def _run(self, operation: OperationAdmitted, started: float) -> list[Event]:
        prices = price_table_at(operation.requested_at)
        provider = self.providers.get(operation.provider)
        if provider is None:
            known = ", ".join(sorted(self.providers))
            result = failed("unknown_provider", f"Provider {operation.provider!r} is not "
                            f"configured; use one of: {known}.")
            return [completed(operation, result, prices, 0, self.clock())]
        events: list[Event] = []
        operation, outcome, fallback = await self._routed(events, operation, prices)
        if isinstance(outcome, VideoJob) and len(outcome.name) > MAX_PROVIDER_OPERATION:
            result = failed("provider_answer_invalid", (
                f"The provider named the started video with {len(outcome.name)} characters, "
                f"more than the {MAX_PROVIDER_OPERATION} a poll may carry; it is not polled."))
            return [*events, completed(operation, result, prices, 0, self.clock())]
        if isinstance(outcome, VideoJob):
            video = VideoStarted(
                **operation.envelope(operation_event_id(
                    operation.client_id, operation.operation_id, "video-started")),
                occurred_at=self.clock(), operation_id=operation.operation_id,
                requested_at=operation.requested_at,
                client_occurred_at=operation.client_occurred_at,
                callback_url=operation.callback_url, provider=operation.provider,
                model=operation.model, provider_operation=outcome.name,
                job=bounded(outcome.metadata),
                fallback=fallback,
            )
            return [*events, video, schedule_poll(video, 1, self.schedule, self.clock())]
        result = outcome
        if fallback is not None:
            result = replace(result, metadata={**result.metadata, "fallback": fallback})
        if self.artifacts is not None:
            result = await store_result(result, self.artifacts, operation.provider)
        duration_ms = round((time.perf_counter() - started) * 1000)
        return [*events, completed(operation, result, prices, duration_ms, self.clock())]

    async def _routed(
        self, events: list[Event], operation: OperationAdmitted, prices: PriceTable
    ) -> tuple[OperationAdmitted, ProviderResult | VideoJob, dict[str, Any] | None]:
        """Run (or, for a video, start) an operation on its model, or, while that model's
        circuit is open, on the first fallback whose circuit is closed (``guard.fallbacks``).

        Returns the operation as it ran (provider and model of the fallback, so it is
        priced at that model), its result (a started ``VideoJob`` for a video), and, when
        another model ran, what the completion says of it: the requested model and why.
        """
        requested = f"{operation.provider}/{operation.model}"
        ran, result = operation, await self._attempt(events, operation)
        tried: list[str] = []
        down = self._down(ran, result)
        # (looked up only for a model that is down: the call already ran, and a lookup
        # that raised would leave it uncosted)
        routes = self.guard.fallbacks(operation.provider, operation.model) if down else ()
        for provider, model in routes:
            if not down:
                break
            assert isinstance(result, ProviderResult)
            tried.append(f"{ran.provider}/{ran.model}: {result.error_message}")
            target = operation.model_copy(update={"provider": provider, "model": model})
            why_not = self._unfit(target, prices)
            if why_not is None and not await self.fallback_slot(target):
                why_not = f"fallback {target.provider}/{target.model}: its rate limit is reached"
            if why_not is not None:  # passed over: the next one is tried
                ran, result = target, failed(PROVIDER_UNAVAILABLE, why_not)
                continue
            ran, result = target, await self._attempt(events, target)
            down = self._down(ran, result)
        if ran is operation:
            return ran, result, None
        fallback = {"requested": requested, "ran": f"{ran.provider}/{ran.model}",
                    "reason": "circuit_open", "tried": tried}
        log.info("fallback", requested=requested, ran=fallback["ran"],
                 success=isinstance(result, VideoJob) or result.success)
        return ran, result, fallback

    def _down(self, ran: OperationAdmitted, result: ProviderResult | VideoJob) -> bool:
        return (isinstance(result, ProviderResult) and not result.success
                and self.guard.is_open(ran.provider, ran.model))

    async def _attempt(
        self, events: list[Event], operation: OperationAdmitted
    ) -> ProviderResult | VideoJob:
        provider = self.providers[operation.provider]
        call: Callable[[OperationAdmitted], Awaitable[ProviderResult | VideoJob]] = (
            provider.start_video if operation.operation_type == "video_generation"
            else provider.generate_image if operation.operation_type == "image_generation"
            else provider.generate_text)
        return await self._guarded(events, operation, lambda: call(operation))

    def _unfit(self, target: OperationAdmitted, prices: PriceTable) -> str | None:
        """Why ``target`` (a fallback) cannot run now, or ``None``."""
        name = f"{target.provider}/{target.model}"
        if target.provider not in self.providers:
            return f"fallback {name}: provider not offered here"
        if target.model not in prices.prices:
            return f"fallback {name}: no price in price table {prices.version}"
        if self.guard.state(target.provider, target.model).status != "closed":
            return f"fallback {name}: its circuit is not closed either"
        problem = params_problem(target.provider, target.operation_type, target.params,
                                 self.param_limits)
        return None if problem is None else f"fallback {name}: {problem}"

    async def poll(self, video: VideoStarted, attempt: int) -> list[Event]:
        """Poll ``video`` once (attempt ``attempt``) and decide what follows; never raises.

        An unexpected error while polling ends the video as a failed completion
        (``internal_error``) rather than leaving it pending with no one polling it.
        """
        try:
            return await self._poll(video, attempt)
        except Exception as exc:
            log.exception("video_poll_failed", provider=video.provider, model=video.model,
                          attempt=attempt, error=f"{type(exc).__name__}: {exc}")
            self.report(exc, request_id=video.request_id, client_id=video.client_id,
                        provider=video.provider, model=video.model)
            error = ProviderError(f"{INTERNAL_ERROR}: {type(exc).__name__}", retryable=False)
            prices = price_table_at(video.requested_at)
            return after_poll(video, attempt, error, self.schedule, prices, self.clock())

    async def _poll(self, video: VideoStarted, attempt: int) -> list[Event]:
        provider = self.providers.get(video.provider)
        job = VideoJob(video.provider_operation, video.job)
        events: list[Event] = []
        if provider is None:
            outcome: Any = ProviderError(f"provider {video.provider!r} is not configured",
                                         retryable=False)
        else:
            guarded = await self.guard.call(
                video.provider, video.model, lambda: provider.poll_video(video.model, job, attempt),
                video.client_id,
            )
            events += self._transitions(video, guarded.transitions)
            outcome = guarded.value if guarded.error is None else guarded.error
            if isinstance(outcome, VideoStatus) and self.artifacts is not None:
                outcome = await store_result(outcome, self.artifacts, video.provider)
            if guarded.error is not None:
                self._report(guarded.error, video, "poll_video")
        prices = price_table_at(video.requested_at)
        return [*events, *after_poll(video, attempt, outcome, self.schedule, prices, self.clock())]

    async def _guarded(
        self, events: list[Event], operation: OperationAdmitted, call: Callable[[], Awaitable[T]]
    ) -> T | ProviderResult:
        guarded: Guarded[T] = await self.guard.call(operation.provider, operation.model, call,
                                                     operation.client_id)
        events += self._transitions(operation, guarded.transitions)
        if guarded.error is None:
            assert guarded.value is not None
            return guarded.value
        exc = guarded.error
        self._report(exc, operation, "call")
        if isinstance(exc, CircuitOpenError):
            return failed(PROVIDER_UNAVAILABLE, PROVIDER_UNAVAILABLE, circuit=exc.circuit)
        reason = "retries_exhausted" if exc.retryable else "provider_error"
        return failed(reason, str(exc), status=exc.status, attempts=guarded.attempts)

    def _report(self, exc: ProviderError, source: OperationAdmitted | VideoStarted,
                stage: str) -> None:
        if isinstance(exc, CircuitOpenError):
            return
        log.warning("provider_error", provider=source.provider, model=source.model,
                    stage=stage, status=exc.status, retryable=exc.retryable, error=str(exc))
        self.report(exc, request_id=source.request_id, client_id=source.client_id,
                    provider=source.provider, model=source.model)

    def _transitions(
        self, source: OperationAdmitted | VideoStarted, transitions: list[Transition]
    ) -> list[Event]:
        events: list[Event] = []
        policy = self.guard.breaker
        for t in transitions:
            envelope = source.envelope(new_event_id())
            if t.after == "open":
                log.warning("circuit_opened", provider=t.provider, model=t.model,
                            failures=t.failures, cooldown_seconds=policy.cooldown,
                            reason=t.reason)
                events.append(ProviderCircuitOpened(
                    **envelope, occurred_at=self.clock(), provider=t.provider, model=t.model,
                    failures=t.failures, window_seconds=policy.window,
                    cooldown_seconds=policy.cooldown, reason=t.reason,
                ))
            elif t.after == "closed":
                open_for = t.at - t.opened_at if t.opened_at is not None else 0.0
                log.info("circuit_closed", provider=t.provider, model=t.model,
                         open_seconds=round(open_for, 3))
                events.append(ProviderCircuitClosed(
                    **envelope, occurred_at=self.clock(), provider=t.provider, model=t.model,
                    open_seconds=max(0.0, open_for),
                ))
        return events

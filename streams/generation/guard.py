"""Provider calls through a circuit breaker per provider and model, with retries inside.

Each attempt asks the breaker first: while the circuit is open the call fails fast with
``provider_unavailable`` and the provider is not called. A retryable failure (429, 5xx,
timeout) counts against the circuit and is retried after a capped, jittered exponential
delay (``backoff.retry_delay``); a permanent one (400, 403, 404) fails at once and leaves
the circuit alone. Anything else the call raises (a bug, a bad value, a cancellation during
a rebalance) says nothing about the provider's health: it is not retried and propagates,
and a half-open circuit's trial is released on the way, so every exit of a trial call
settles it. The state lives in the worker; the transitions are returned so the caller can
emit them as events. Clock, sleep and randomness are injected. With tracing on, each
attempt is a ``provider_call`` span (``aipipe.streams.spans``).

While a model's circuit is open, ``fallbacks`` names the models an operation may run on
instead (from the limits file, see ``streams/admission/limits.py``); ``service.Generation``
picks the first whose circuit is closed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from aipipe.infra import metrics
from aipipe.streams import spans
from aipipe.streams.generation.backoff import retry_delay
from aipipe.streams.generation.breaker import (
    CLOSED,
    BreakerPolicy,
    BreakerState,
    Status,
    before_call,
    on_failure,
    on_neutral,
    on_success,
)
from aipipe.streams.generation.provider import ProviderError

T = TypeVar("T")
PROVIDER_UNAVAILABLE = "provider_unavailable"
Fallbacks = Callable[[str, str], Sequence[tuple[str, str]]]


def _no_fallbacks(provider: str, model: str) -> Sequence[tuple[str, str]]:
    return ()


class CircuitOpenError(ProviderError):
    """The circuit of a provider and model is open: the call was not made."""

    def __init__(self, provider: str, model: str) -> None:
        super().__init__(PROVIDER_UNAVAILABLE, retryable=True)
        self.circuit = f"{provider}/{model}"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base: float = 0.5
    cap: float = 8.0


@dataclass(frozen=True)
class Transition:
    provider: str
    model: str
    before: Status
    after: Status
    failures: int
    at: float
    opened_at: float | None
    reason: str


@dataclass
class Guarded(Generic[T]):
    """What a guarded call came to: a value or the last error, and what happened on the way."""

    value: T | None = None
    error: ProviderError | None = None
    attempts: int = 0
    delays: list[float] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)


class ProviderGuard:
    def __init__(
        self,
        breaker: BreakerPolicy | None = None,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        fallbacks: Fallbacks = _no_fallbacks,
    ) -> None:
        self.breaker = breaker or BreakerPolicy()
        self.retry = retry or RetryPolicy()
        self.clock, self.sleep, self.rand = clock, sleep, rand
        self.states: dict[tuple[str, str], BreakerState] = {}
        # (provider, model) -> the (provider, model) pairs to run on while it is open
        self.fallbacks = fallbacks

    def state(self, provider: str, model: str) -> BreakerState:
        return self.states.get((provider, model), CLOSED)

    def is_open(self, provider: str, model: str) -> bool:
        """The circuit is open (calls fail fast), whether or not its cool-down has passed."""
        return self.state(provider, model).status != "closed"

    def _store(self, provider: str, model: str, state: BreakerState) -> None:
        self.states[(provider, model)] = state
        metrics.CIRCUIT_STATE.labels(provider, model).set(metrics.CIRCUIT_VALUES[state.status])

    def _set(self, out: Guarded[T], provider: str, model: str, new: BreakerState,
             reason: str) -> None:
        old = self.state(provider, model)
        self._store(provider, model, new)
        if old.status != new.status and new.status != "half_open":
            out.transitions.append(Transition(
                provider, model, old.status, new.status, len(new.failures), self.clock(),
                old.opened_at, reason,
            ))

    async def call(
        self, provider: str, model: str, fn: Callable[[], Awaitable[T]], client: str = ""
    ) -> Guarded[T]:
        """``fn`` through the breaker of ``provider``/``model``, retried; ``client`` is whose
        call it is (one client's failures alone do not open the circuit, see ``breaker``)."""
        out: Guarded[T] = Guarded()
        for attempt in range(1, self.retry.attempts + 1):
            before = self.state(provider, model)
            allowed, state = before_call(before, self.breaker, self.clock(), client)
            self._store(provider, model, state)
            if not allowed:
                out.error = CircuitOpenError(provider, model)
                metrics.PROVIDER_CALLS.labels(provider, model, "circuit_open").inc()
                return out
            trial = state.trial_in_flight and not before.trial_in_flight  # this call is it
            out.attempts = attempt
            started = time.monotonic()
            try:
                try:
                    with spans.provider_call(provider, model, attempt):
                        out.value = await fn()
                finally:
                    metrics.PROVIDER_LATENCY.labels(provider, model).observe(
                        time.monotonic() - started)
            except ProviderError as exc:
                observe_failure(provider, model, exc)
                out.error = exc
                if not exc.retryable:
                    if trial:
                        self._set(out, provider, model, on_neutral(self.state(provider, model)),
                                  str(exc))
                    return out
                failed = on_failure(self.state(provider, model), self.breaker, self.clock(),
                                    client)
                self._set(out, provider, model, failed, str(exc))
                if attempt == self.retry.attempts:
                    return out
                delay = retry_delay(attempt, self.retry.base, self.retry.cap, self.rand)
                out.delays.append(delay)
                await self.sleep(delay)
            except BaseException:  # not the provider's answer, cancellation included
                if trial:
                    self._store(provider, model, on_neutral(self.state(provider, model)))
                raise
            else:
                metrics.PROVIDER_CALLS.labels(provider, model, "ok").inc()
                out.error = None
                self._set(out, provider, model,
                          on_success(self.state(provider, model), self.clock(), client), "ok")
                return out
        return out


def observe_failure(provider: str, model: str, exc: ProviderError) -> None:
    """Count a failed attempt: by whether it is retried, and by HTTP status class."""
    metrics.PROVIDER_CALLS.labels(
        provider, model, "retryable" if exc.retryable else "permanent").inc()
    status = f"{exc.status // 100}xx" if exc.status else "none"
    metrics.PROVIDER_ERRORS.labels(provider, model, status).inc()

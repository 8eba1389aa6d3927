"""Guarded provider calls: retries inside the breaker, fail fast while open (fake clock)."""

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from aipipe.streams.generation.breaker import BreakerPolicy
from aipipe.streams.generation.guard import CircuitOpenError, ProviderGuard, RetryPolicy
from aipipe.streams.generation.provider import ProviderError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def guard(clock: Clock, attempts: int = 4, threshold: int = 5) -> ProviderGuard:
    return ProviderGuard(
        breaker=BreakerPolicy(threshold=threshold, window=60, cooldown=30),
        retry=RetryPolicy(attempts=attempts, base=0.5, cap=2.0),
        clock=clock, sleep=clock.sleep, rand=lambda: 0.5,
    )


def scripted(*outcomes: int) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    """A call that raises the given statuses in order, then returns "ok"."""
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        if len(calls) <= len(outcomes):
            raise ProviderError.from_status(outcomes[len(calls) - 1], "scripted")
        return "ok"

    return calls, call


def test_retryable_errors_are_retried_with_growing_capped_delays() -> None:
    clock = Clock()
    calls, call = scripted(503, 429, 503)
    out = asyncio.run(guard(clock).call("gemini", "m", call))
    assert (out.value, out.error, out.attempts, len(calls)) == ("ok", None, 4, 4)
    assert clock.slept == [0.375, 0.75, 1.5]  # 0.5, 1, 2 (capped) x 0.75 jitter
    assert all(d <= 2.0 for d in clock.slept)


def test_retries_stop_at_the_attempt_limit() -> None:
    clock = Clock()
    calls, call = scripted(503, 503, 503, 503, 503)
    out = asyncio.run(guard(clock, attempts=3).call("gemini", "m", call))
    assert out.value is None and isinstance(out.error, ProviderError)
    assert (out.error.status, len(calls), len(clock.slept)) == (503, 3, 2)


@pytest.mark.parametrize("status", [400, 403, 404])
def test_permanent_errors_fail_at_once_and_leave_the_circuit_closed(status: int) -> None:
    clock = Clock()
    g = guard(clock, threshold=1)
    calls, call = scripted(status)
    out = asyncio.run(g.call("gemini", "m", call))
    assert out.error is not None and out.error.status == status
    assert len(calls) == 1 and clock.slept == []
    assert g.state("gemini", "m").status == "closed"


def test_the_circuit_opens_fails_fast_and_closes_after_a_successful_trial() -> None:
    clock = Clock()
    g = guard(clock, attempts=2, threshold=3)
    calls, failing = scripted(*[503] * 10)
    first = asyncio.run(g.call("gemini", "m", failing))
    second = asyncio.run(g.call("gemini", "m", failing))  # 3rd failure opens: no 4th call
    assert [t.after for t in first.transitions + second.transitions] == ["open"]
    assert len(calls) == 3 and isinstance(second.error, CircuitOpenError)

    before = len(calls)
    fast = asyncio.run(g.call("gemini", "m", failing))
    assert isinstance(fast.error, CircuitOpenError) and len(calls) == before
    assert str(fast.error) == "provider_unavailable"
    other = asyncio.run(g.call("gemini", "other-model", scripted()[1]))
    assert other.value == "ok"  # per provider and model

    clock.now += 31
    _, healthy = scripted()
    closed = asyncio.run(g.call("gemini", "m", healthy))
    assert closed.value == "ok"
    assert [(t.before, t.after) for t in closed.transitions] == [("half_open", "closed")]
    assert g.state("gemini", "m").status == "closed"


def opened(clock: Clock) -> ProviderGuard:
    """A guard whose gemini/m circuit is open and past its cool-down: the next call is a trial."""
    g = guard(clock, attempts=1, threshold=1)
    asyncio.run(g.call("gemini", "m", scripted(503)[1]))
    assert g.state("gemini", "m").status == "open"
    clock.now += 31
    return g


@pytest.mark.parametrize("error", [ValueError("bad param"), KeyError("usage"), RuntimeError()])
def test_a_trial_that_raises_a_non_provider_error_releases_the_trial(error: Exception) -> None:
    clock = Clock()
    g = opened(clock)

    async def broken() -> str:
        raise error

    with pytest.raises(type(error)):
        asyncio.run(g.call("gemini", "m", broken))
    state = g.state("gemini", "m")
    assert (state.status, state.trial_in_flight) == ("half_open", False)  # neutral, released
    healthy = asyncio.run(g.call("gemini", "m", scripted()[1]))  # the next call is the trial
    assert healthy.value == "ok" and g.state("gemini", "m").status == "closed"


def test_a_cancelled_trial_releases_the_trial() -> None:
    clock = Clock()
    g = opened(clock)

    async def scenario() -> None:
        started = asyncio.Event()

        async def hangs() -> str:
            started.set()
            await asyncio.Event().wait()  # a provider that never answers
            return "never"

        task = asyncio.create_task(g.call("gemini", "m", hangs))
        await started.wait()
        assert g.state("gemini", "m").trial_in_flight
        blocked = await g.call("gemini", "m", scripted()[1])  # one trial at a time
        assert isinstance(blocked.error, CircuitOpenError)
        task.cancel()  # a rebalance takes the partition away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert g.state("gemini", "m").trial_in_flight is False
    after = asyncio.run(g.call("gemini", "m", scripted()[1]))
    assert after.value == "ok" and g.state("gemini", "m").status == "closed"


def test_a_non_provider_error_outside_a_trial_leaves_the_circuit_alone() -> None:
    clock = Clock()
    g = guard(clock, threshold=1)

    async def broken() -> str:
        raise ValueError("bad param")

    with pytest.raises(ValueError):
        asyncio.run(g.call("gemini", "m", broken))
    assert g.state("gemini", "m").status == "closed"


def test_one_clients_failing_requests_leave_the_circuit_closed_for_the_others() -> None:
    """The retries of a client whose requests make the provider fail count at most half
    the threshold while another client is being served; the others' calls go through."""
    clock = Clock()
    g = guard(clock, attempts=4, threshold=5)

    def hostile() -> None:
        out = asyncio.run(g.call("openai", "m", scripted(503, 503, 503, 503)[1], "hostile"))
        assert isinstance(out.error, ProviderError) and out.attempts == 4
        assert not isinstance(out.error, CircuitOpenError) and out.transitions == []

    def steady() -> None:
        calls, call = scripted()
        assert asyncio.run(g.call("openai", "m", call, "steady")).value == "ok"
        assert calls == [1]

    hostile()  # 4 failures, under the threshold
    steady()  # served after them
    hostile()
    hostile()  # 12 failed attempts in all, counted as 3
    assert g.state("openai", "m").status == "closed"
    steady()
    # an outage that fails the others too opens it: 3 of the hostile's and 2 of steady's
    out = asyncio.run(g.call("openai", "m", scripted(503, 503, 503, 503)[1], "steady"))
    assert g.state("openai", "m").status == "open"
    assert [(t.before, t.after) for t in out.transitions] == [("closed", "open")]

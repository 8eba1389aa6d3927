"""Circuit-breaker transitions, pure functions of ``(state, now)``.

closed → open after ``threshold`` failures within ``window`` seconds; open → half-open
once ``cooldown`` seconds have passed, letting one trial call through; half-open →
closed when the trial succeeds, back to open when it fails, and half-open with the trial
released when it ends saying nothing about the provider (``on_neutral``), so the next call
is the trial. Only failures that say the provider is unhealthy (429, 5xx, timeouts)
count; a rejected request (400, 403, 404), an exception that is not the provider's answer
and a cancelled call are neutral.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Status = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class BreakerPolicy:
    threshold: int = 5
    window: float = 60.0
    cooldown: float = 30.0


@dataclass(frozen=True)
class BreakerState:
    status: Status = "closed"
    failures: tuple[float, ...] = ()  # times of recent failures while closed
    opened_at: float | None = None
    trial_in_flight: bool = False


CLOSED = BreakerState()


def before_call(
    state: BreakerState, policy: BreakerPolicy, now: float
) -> tuple[bool, BreakerState]:
    """May a call go through now? Open turns half-open after the cool-down (one trial)."""
    if state.status == "closed":
        return True, state
    if state.status == "open":
        assert state.opened_at is not None
        if now - state.opened_at < policy.cooldown:
            return False, state
        return True, replace(state, status="half_open", trial_in_flight=True)
    if state.trial_in_flight:
        return False, state
    return True, replace(state, trial_in_flight=True)


def on_success(state: BreakerState) -> BreakerState:
    """A trial that succeeds closes the circuit; while closed, failures age out on their own."""
    return CLOSED if state.status == "half_open" else state


def on_failure(state: BreakerState, policy: BreakerPolicy, now: float) -> BreakerState:
    if state.status == "half_open":
        return BreakerState(status="open", opened_at=now)
    if state.status == "open":
        return state
    recent = (*(t for t in state.failures if now - t < policy.window), now)
    if len(recent) >= policy.threshold:
        return BreakerState(status="open", failures=recent, opened_at=now)
    return replace(state, failures=recent)


def on_neutral(state: BreakerState) -> BreakerState:
    """A call that ended without saying anything about the provider's health (a 400, a bug,
    a cancellation): a half-open circuit's trial is released."""
    return replace(state, trial_in_flight=False) if state.status == "half_open" else state

"""Circuit-breaker transitions, pure functions of ``(state, now)``.

closed → open after ``threshold`` failures within ``window`` seconds; open → half-open
once ``cooldown`` seconds have passed, letting one trial call through; half-open →
closed when the trial succeeds, back to open when it fails, and half-open with the trial
released when it ends saying nothing about the provider (``on_neutral``), so the next call
is the trial. Only failures that say the provider is unhealthy (429, 5xx, timeouts)
count; a rejected request (400, 403, 404), an exception that is not the provider's answer
and a cancelled call are neutral.

One client cannot open a circuit for everyone: while another client's call succeeded
within ``window`` and after this client's first failure in it, a client's failures count
at most ``client_share`` times (by default half the threshold, rounded up), so opening
then takes the failures of two clients or more. A client whose requests alone make the
provider fail (a prompt that times out, a size it chokes on) keeps failing with retries;
the others keep being served. When no other client was served since a client's first
failure (one tenant, or the provider down for all), its failures all count, as before.

Nor can one client keep a circuit open by taking every trial with a request that fails:
a client whose trial failed since the circuit last closed (the latest ``TRIAL_MEMORY`` of
them) may not take the trial again until a second cool-down has passed since the circuit
reopened, so another client's call is the trial first. With one tenant, or the provider
down for all, the circuit is tried every two cool-downs instead of every one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

Status = Literal["closed", "open", "half_open"]
TRIAL_MEMORY = 8  # the clients whose trials failed that a circuit remembers


@dataclass(frozen=True)
class BreakerPolicy:
    threshold: int = 5
    window: float = 60.0
    cooldown: float = 30.0
    client_share: int | None = None  # None: (threshold + 1) // 2

    @property
    def share(self) -> int:
        return self.client_share or (self.threshold + 1) // 2


@dataclass(frozen=True)
class BreakerState:
    status: Status = "closed"
    failures: tuple[float, ...] = ()  # times of recent failures while closed
    opened_at: float | None = None
    trial_in_flight: bool = False
    sources: tuple[str, ...] = ()  # the client of each of ``failures``
    # the latest success of the two clients served most recently: (client, time)
    served: tuple[tuple[str, float], ...] = ()
    # the clients whose trials failed since the circuit last closed, the latest last
    failed_trials: tuple[str, ...] = ()


CLOSED = BreakerState()


def before_call(
    state: BreakerState, policy: BreakerPolicy, now: float, client: str = ""
) -> tuple[bool, BreakerState]:
    """May ``client``'s call go through now? Open turns half-open after the cool-down (one
    trial), which a client whose trial failed takes only after a second cool-down."""
    if state.status == "closed":
        return True, state
    assert state.opened_at is not None
    if (client and client in state.failed_trials
            and now - state.opened_at < 2 * policy.cooldown):
        return False, state
    if state.status == "open":
        if now - state.opened_at < policy.cooldown:
            return False, state
        return True, replace(state, status="half_open", trial_in_flight=True)
    if state.trial_in_flight:
        return False, state
    return True, replace(state, trial_in_flight=True)


def on_success(state: BreakerState, now: float = 0.0, client: str = "") -> BreakerState:
    """A trial that succeeds closes the circuit; while closed, failures age out on their own
    and the success is remembered for ``client`` (see ``on_failure``)."""
    served = state.served
    if not served or served[0][0] != client or now - served[0][1] >= 1.0:
        served = ((client, now), *(s for s in served if s[0] != client))[:2]
    if state.status == "half_open":
        return replace(CLOSED, served=served)
    return state if served is state.served else replace(state, served=served)


def counted(failures: Sequence[tuple[float, str]], served: Sequence[tuple[str, float]],
            policy: BreakerPolicy, now: float) -> int:
    """How many of ``failures`` (time, client), all within the window, count: a client's
    count is capped at ``policy.share`` while another client was served after that client's
    first failure in the window (the provider answers others now, not only before an
    outage began)."""
    first: dict[str, float] = {}
    per_client: Counter[str] = Counter()
    for t, client in failures:
        first[client] = min(t, first.get(client, t))
        per_client[client] += 1
    total = 0
    for client, n in per_client.items():
        others_served = any(c != client and now - t < policy.window and t > first[client]
                            for c, t in served)
        total += min(n, policy.share) if others_served else n
    return total


def on_failure(state: BreakerState, policy: BreakerPolicy, now: float,
               client: str = "") -> BreakerState:
    if state.status == "half_open":  # the trial failed
        failed = state.failed_trials
        if client:  # (a call that names no client cannot be told apart: not remembered)
            failed = (*(c for c in failed if c != client), client)[-TRIAL_MEMORY:]
        return BreakerState(status="open", opened_at=now, served=state.served,
                            failed_trials=failed)
    if state.status == "open":
        return state
    # newest first, within the window
    recent = [(now, client), *((t, c) for t, c in zip(reversed(state.failures),
                                                      reversed(state.sources), strict=True)
                               if now - t < policy.window)]
    oldest = {c: i for i, (_, c) in enumerate(recent)}
    kept: list[tuple[float, str]] = []
    seen: Counter[str] = Counter()
    # of each client, its newest failures up to the threshold and its first in the window:
    # more can never count, so a client that fails without end keeps the state small
    for i, (t, c) in enumerate(recent):
        if seen[c] < policy.threshold - 1 or i == oldest[c]:
            kept.append((t, c))
        seen[c] += 1
    kept.reverse()
    times = tuple(t for t, _ in kept)
    sources = tuple(c for _, c in kept)
    if counted(kept, state.served, policy, now) >= policy.threshold:
        return BreakerState(status="open", failures=times, opened_at=now,
                            sources=sources, served=state.served)
    return replace(state, failures=times, sources=sources)


def on_neutral(state: BreakerState) -> BreakerState:
    """A call that ended without saying anything about the provider's health (a 400, a bug,
    a cancellation): a half-open circuit's trial is released."""
    return replace(state, trial_in_flight=False) if state.status == "half_open" else state

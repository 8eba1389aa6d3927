"""Wait schedules, pure: the video poll schedule and the jittered retry delay.

The poll schedule is ``base``, then times ``factor`` each time, capped at ``cap``:
2, 3, 4.5, 6.75, 10.125, … 30, 30 with the defaults. A video whose next wait would take
the scheduled total past ``max_total`` is given up on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def wait_for_attempt(n: int, base: float = 2.0, factor: float = 1.5, cap: float = 30.0) -> float:
    """The wait before poll ``n`` (1-based): ``min(cap, base * factor ** (n - 1))``."""
    if n < 1:
        raise ValueError(f"attempt must be 1 or more, not {n}")
    wait = base
    for _ in range(n - 1):  # multiply up rather than factor ** n, which can overflow
        if wait >= cap:
            break
        wait *= factor
    return min(wait, cap)


@dataclass(frozen=True)
class PollSchedule:
    """The video poll schedule, from settings."""

    base: float = 2.0
    factor: float = 1.5
    cap: float = 30.0
    max_total: float = 600.0

    def wait(self, attempt: int) -> float:
        return wait_for_attempt(attempt, self.base, self.factor, self.cap)

    def total_until(self, attempt: int) -> float:
        """The scheduled waits summed up to and including the wait before ``attempt``."""
        return sum(self.wait(n) for n in range(1, attempt + 1))

    def gives_up_before(self, attempt: int) -> bool:
        """True when waiting for ``attempt`` would take the total past ``max_total``."""
        return self.total_until(attempt) > self.max_total


def retry_delay(
    retry: int, base: float, cap: float, rand: Callable[[], float]
) -> float:
    """The delay before retry ``retry`` (1-based): capped exponential with equal jitter.

    ``min(cap, base * 2 ** (retry - 1))`` scaled by a factor in [0.5, 1.0) from ``rand``
    (a uniform [0, 1) source), so delays grow, spread out, and never exceed ``cap``.
    """
    if retry < 1:
        raise ValueError(f"retry must be 1 or more, not {retry}")
    ceiling = cap if retry > 64 else min(cap, base * 2 ** (retry - 1))
    return ceiling * (0.5 + rand() / 2)

"""Sliding-log rate limiting: the arithmetic, with time passed in. No I/O.

A limit is COUNT admissions per WINDOW. An admission at time ``t`` counts against the
window at time ``now`` while ``t > now - window``: it occupies the window for exactly
``window`` and then leaves. A request is admitted when fewer than COUNT admissions are
in the window. When the window is full, the earliest moment a retry can succeed is when
enough of the oldest admissions have left to free one slot:
``retry_after = log[size - count] + window - now`` (the log sorted oldest first).

A decision checks two logs (the client's and the provider model's) and admits only if
both allow; only then is it recorded in both. The Redis Lua script
(``aipipe.streams.admission.limiter``) implements exactly these rules; the contract tests hold
both to them. Times are integer microseconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from aipipe.schemas.limits import US_PER_MS, Limit


@dataclass(slots=True)
class SlidingLog:
    """The admissions of one key, oldest first, as (time, member)."""

    entries: deque[tuple[int, str]] = field(default_factory=deque)
    members: set[str] = field(default_factory=set)

    def prune(self, now_us: int, window_us: int) -> None:
        """Drop the admissions that have left the window ending at ``now_us``."""
        edge = now_us - window_us
        while self.entries and self.entries[0][0] <= edge:
            _, member = self.entries.popleft()
            self.members.discard(member)

    def retry_after_us(self, now_us: int, limit: Limit) -> int:
        """0 when a slot is free, else how long until the oldest blocking admission leaves."""
        size = len(self.entries)
        if size < limit.count:
            return 0
        return self.entries[size - limit.count][0] + limit.window_us - now_us

    def add(self, now_us: int, member: str) -> None:
        self.entries.append((now_us, member))
        self.members.add(member)

    @property
    def newest_us(self) -> int | None:
        return self.entries[-1][0] if self.entries else None


@dataclass(frozen=True, slots=True)
class Check:
    """One request to decide: its member (the client and the request's event id,
    ``operation_key``) and the client and model logs with their limits; a ``None`` limit
    means no limit of that kind applies.
    """

    member: str
    client_key: str
    client_limit: Limit | None
    model_key: str
    model_limit: Limit | None

    def pairs(self) -> tuple[tuple[str, Limit | None], tuple[str, Limit | None]]:
        return (self.client_key, self.client_limit), (self.model_key, self.model_limit)


CLIENT, MODEL = 1, 2  # ``Outcome.limited_by``: which limit refused (0: none)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the limiter decided for one check, at limiter time ``at_us``.

    ``remaining`` is the free slots left in the client and model windows after this
    decision (``None`` where no limit applies). ``duplicate`` marks a member that was
    already admitted within the window: admitted again without using another slot.
    """

    admitted: bool
    at_us: int
    limited_by: int = 0
    retry_after_us: int = 0
    remaining: tuple[int | None, int | None] = (None, None)
    duplicate: bool = False

    @property
    def retry_after_ms(self) -> int:
        return -(-self.retry_after_us // US_PER_MS)


def decide_one(logs: Sequence[SlidingLog | None], check: Check, now_us: int) -> Outcome:
    """Admit ``check`` at ``now_us`` if every applicable log has a free slot; record it.

    ``logs`` are the logs of ``check.pairs()`` in order (``None`` where no limit applies).
    """
    pairs = check.pairs()
    active = [(log, limit) for log, (_, limit) in zip(logs, pairs, strict=True)
              if log is not None and limit is not None]
    for log, limit in active:
        log.prune(now_us, limit.window_us)
    if any(check.member in log.members for log, _ in active):
        return Outcome(True, now_us, remaining=_remaining(logs, pairs), duplicate=True)
    limited_by, retry = 0, 0
    for index, (maybe_log, (_, maybe_limit)) in enumerate(zip(logs, pairs, strict=True), 1):
        if maybe_log is None or maybe_limit is None:
            continue
        wait = maybe_log.retry_after_us(now_us, maybe_limit)
        if wait > retry or (wait > 0 and limited_by == 0):
            limited_by, retry = index, wait
    if limited_by:
        return Outcome(False, now_us, limited_by, retry, _remaining(logs, pairs))
    for log, _ in active:
        log.add(now_us, check.member)
    return Outcome(True, now_us, remaining=_remaining(logs, pairs))


def _remaining(
    logs: Sequence[SlidingLog | None], pairs: Sequence[tuple[str, Limit | None]]
) -> tuple[int | None, int | None]:
    out: list[int | None] = []
    for log, (_, limit) in zip(logs, pairs, strict=True):
        out.append(None if log is None or limit is None else max(limit.count - len(log.entries), 0))
    return out[0], out[1]

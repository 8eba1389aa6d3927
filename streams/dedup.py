"""Dedup state with a horizon: what the streams' dedup tables remember, and for how long.

``seen-requests`` and ``done-operations`` hold, per key, the time it was marked (epoch
seconds, a float); ``started-operations`` holds ``[attempt, time]``. A key marked less
than the horizon ago is remembered exactly; an older one is forgotten: ``is_fresh`` says
so at lookup (so a key the changelog still brings back after a restart is forgotten all
the same), a timer drops it from memory (``purge``), and the changelog's
``cleanup.policy=compact,delete`` with ``retention.ms`` = the horizon (``changelog_config``)
lets the broker drop it from the topic, so recovery reads only the horizon's traffic.

Values written before the horizon existed carry no time (``true``, or a bare attempt
number): they count as marked when a worker first purges them, so they are remembered
for one horizon from then.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: how often the purge timer runs, at most (a 7-day horizon: every 5 minutes)
PURGE_EVERY_MAX_SECONDS = 300.0
#: keys the purge checks between two turns of the event loop
PURGE_CHUNK = 5000


def mark(now: float) -> float:
    """The value of a ``seen-requests`` / ``done-operations`` key marked at ``now``."""
    return round(now, 3)


def attempt_mark(attempt: int, now: float) -> list[Any]:
    """The value of a ``started-operations`` key: its attempt, marked at ``now``."""
    return [attempt, round(now, 3)]


def marked_at(value: Any) -> float | None:
    """When ``value`` was marked; None for a value written before values carried a time."""
    if isinstance(value, list) and len(value) == 2:
        return float(value[1])
    if isinstance(value, float):
        return value
    return None  # legacy: true, or a bare attempt number


def is_fresh(value: Any, now: float, horizon: float) -> bool:
    """Whether a table's ``value`` (None or False: no entry) is still remembered at ``now``."""
    if value is None or value is False:
        return False
    at = marked_at(value)
    return at is None or now - at < horizon


def attempt_of(value: Any, now: float, horizon: float) -> int:
    """The last attempt started, from a ``started-operations`` value (0: none remembered)."""
    if not is_fresh(value, now, horizon):
        return 0
    return int(value[0]) if isinstance(value, list) else int(value)


@dataclass(frozen=True)
class Purged:
    expired: int  # keys dropped: marked a horizon ago or more
    dated: int  # legacy values given the purge's time
    kept: int  # keys left


def purge_keys(
    store: MutableMapping[Any, Any], keys: Iterable[Any], now: float, horizon: float
) -> Purged:
    """Drop those of ``keys`` in ``store`` marked ``horizon`` seconds before ``now`` or earlier.

    ``store`` is a table's local store (``table.data``): nothing is written to the
    changelog, whose retention drops the same records on the broker. A legacy value
    without a time is given ``now``.
    """
    cutoff, expired, dated = now - horizon, 0, 0
    for key in keys:
        value = store.get(key)
        if value is None:
            continue
        at = marked_at(value)
        if at is None:
            store[key] = mark(now) if isinstance(value, bool) else attempt_mark(int(value), now)
            dated += 1
        elif at <= cutoff:
            del store[key]
            expired += 1
    return Purged(expired=expired, dated=dated, kept=len(store))


async def purge(
    store: MutableMapping[Any, Any], now: float, horizon: float,
    pause: Callable[[], Awaitable[None]], chunk: int = PURGE_CHUNK,
) -> Purged:
    """``purge_keys`` over every key of ``store``, ``chunk`` keys at a time with a ``pause``
    between (the event loop's turn: a million keys take seconds of CPU)."""
    keys, expired, dated = list(store), 0, 0
    for start in range(0, len(keys), chunk):
        done = purge_keys(store, keys[start:start + chunk], now, horizon)
        expired, dated = expired + done.expired, dated + done.dated
        await pause()
    return Purged(expired=expired, dated=dated, kept=len(store))


def stale_operation(requested_at: datetime, now: datetime, horizon: float,
                    skew: float) -> str | None:
    """Why an admitted operation is not run, or ``None``: admitted longer ago than the
    horizon less the clock skew between workers. Its done mark, taken no earlier than its
    admission, may have expired (a consumer group reset to old offsets, workers stopped for
    longer than the horizon), so it may have run already, and the provider would bill again.
    """
    if (now - requested_at).total_seconds() < horizon - skew:
        return None
    return (f"Operation admitted at {requested_at:%Y-%m-%dT%H:%M:%SZ}, longer ago than the "
            f"{(horizon - skew) / 3600:g} h the streams remember a completed operation for, "
            "so it may have run already and is not run again; send a new request if it is "
            "still wanted.")


def purge_interval(horizon: float) -> float:
    """Seconds between purges: a quarter of the horizon, at most 5 minutes."""
    return min(max(horizon / 4, 0.5), PURGE_EVERY_MAX_SECONDS)


def changelog_config(horizon: float) -> dict[str, str]:
    """Topic config of a dedup table's changelog: compacted, and nothing kept past the horizon.

    ``segment.ms`` (a quarter of the horizon, at most a day) lets whole segments age out:
    a record stays on the broker at most about ``horizon + segment.ms``.
    """
    retention_ms = max(1, math.ceil(horizon * 1000))
    return {
        "cleanup.policy": "compact,delete",
        "retention.ms": str(retention_ms),
        "segment.ms": str(max(1000, min(retention_ms // 4, 86_400_000))),
    }

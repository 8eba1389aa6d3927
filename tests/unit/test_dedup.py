"""Dedup state with a horizon (streams/dedup.py): what is remembered, for how long, with an
injected clock (plain floats: epoch seconds)."""

from __future__ import annotations

import asyncio
import json

from aipipe.streams import dedup

HOUR = 3600.0
T0 = 1_800_000_000.0


def test_a_key_is_remembered_until_the_horizon_and_not_after() -> None:
    value = dedup.mark(T0)
    assert dedup.is_fresh(value, T0, HOUR)
    assert dedup.is_fresh(value, T0 + HOUR - 0.001, HOUR)
    assert not dedup.is_fresh(value, T0 + HOUR, HOUR)
    assert not dedup.is_fresh(value, T0 + 10 * HOUR, HOUR)


def test_no_entry_is_not_remembered() -> None:
    assert not dedup.is_fresh(None, T0, HOUR)
    assert not dedup.is_fresh(False, T0, HOUR)


def test_a_value_from_before_the_horizon_existed_is_remembered() -> None:
    assert dedup.is_fresh(True, T0, HOUR)  # seen-requests / done-operations
    assert dedup.attempt_of(2, T0, HOUR) == 2  # started-operations: a bare attempt


def test_the_attempt_is_remembered_for_the_horizon() -> None:
    value = dedup.attempt_mark(3, T0)
    assert value == [3, T0]
    assert dedup.attempt_of(value, T0 + HOUR - 1, HOUR) == 3
    assert dedup.attempt_of(value, T0 + HOUR, HOUR) == 0
    assert dedup.attempt_of(None, T0, HOUR) == 0


def test_values_survive_the_changelogs_json() -> None:
    for value in (dedup.mark(T0 + 0.1234), dedup.attempt_mark(1, T0)):
        back = json.loads(json.dumps(value))
        assert dedup.marked_at(back) == dedup.marked_at(value)
    assert dedup.marked_at(json.loads(json.dumps(dedup.mark(T0)))) == T0  # a whole second


def purge(store: dict[str, object], now: float, chunk: int = 2) -> dedup.Purged:
    return asyncio.run(dedup.purge(store, now, HOUR, pause=lambda: asyncio.sleep(0),
                                   chunk=chunk))


def test_purge_drops_exactly_the_keys_older_than_the_horizon() -> None:
    store = {
        "old": dedup.mark(T0),
        "edge": dedup.mark(T0 + 1),
        "new": dedup.mark(T0 + HOUR),
        "started-old": dedup.attempt_mark(1, T0),
        "started-new": dedup.attempt_mark(2, T0 + 2),
    }
    purged = purge(store, T0 + HOUR + 1)
    assert purged == dedup.Purged(expired=3, dated=0, kept=2)
    assert store == {"new": T0 + HOUR, "started-new": [2, T0 + 2]}


def test_purge_gives_legacy_values_the_purges_time_then_expires_them_a_horizon_later() -> None:
    store: dict[str, object] = {"seen": True, "started": 2}
    assert purge(store, T0) == dedup.Purged(expired=0, dated=2, kept=2)
    assert store == {"seen": T0, "started": [2, T0]}
    assert purge(store, T0 + HOUR - 1) == dedup.Purged(expired=0, dated=0, kept=2)
    assert purge(store, T0 + HOUR) == dedup.Purged(expired=2, dated=0, kept=0)
    assert store == {}


def test_purge_of_an_empty_store() -> None:
    assert purge({}, T0) == dedup.Purged(expired=0, dated=0, kept=0)


def test_purge_interval_is_a_quarter_of_the_horizon_within_bounds() -> None:
    assert dedup.purge_interval(7 * 24 * HOUR) == 300.0
    assert dedup.purge_interval(20.0) == 5.0
    assert dedup.purge_interval(1.0) == 0.5


def test_changelog_config_keeps_records_for_the_horizon() -> None:
    assert dedup.changelog_config(7 * 24 * HOUR) == {
        "cleanup.policy": "compact,delete",
        "retention.ms": str(7 * 24 * 3_600_000),
        "segment.ms": "86400000",  # a day at most
    }
    assert dedup.changelog_config(HOUR) == {
        "cleanup.policy": "compact,delete", "retention.ms": "3600000", "segment.ms": "900000",
    }
    assert dedup.changelog_config(2.0)["segment.ms"] == "1000"


def test_purge_pauses_between_chunks_and_skips_keys_gone_meanwhile() -> None:
    store = {f"k{i}": dedup.mark(T0) for i in range(5)}
    pauses = []

    async def pause() -> None:
        pauses.append(len(store))
        store.pop("k4", None)  # dropped while the purge waits for its turn

    purged = asyncio.run(dedup.purge(store, T0 + HOUR, HOUR, pause=pause, chunk=2))
    assert pauses == [3, 0, 0]
    assert purged == dedup.Purged(expired=4, dated=0, kept=0)


def test_an_operation_admitted_longer_ago_than_the_horizon_less_the_skew_is_stale() -> None:
    """Its done mark, taken no earlier than its admission, may be gone: not run again."""
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 12, 3, 12, tzinfo=UTC)
    horizon, skew = 168 * 3600.0, 300.0
    edge = now - timedelta(seconds=horizon - skew)
    assert dedup.stale_operation(edge + timedelta(milliseconds=1), now, horizon, skew) is None
    reason = dedup.stale_operation(edge, now, horizon, skew)
    assert reason == (
        "Operation admitted at 2026-11-26T12:05:00Z, longer ago than the 167.917 h the streams "
        "remember a completed operation for, so it may have run already and is not run again; "
        "send a new request if it is still wanted.")

"""Which offset the streams' consumer commits, given the acknowledgements it has.

faust's rule (``Consumer._new_offset``) commits the first unbroken run of acknowledged
offsets; ``SafeSeekConsumer`` commits it only when it starts exactly where the partition
must resume. The cases are the ones that lost events under load: acknowledgements out
of order with one message still in flight, before and after the first commit.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from faust.transport.consumer import Consumer as FaustConsumer
from intervaltree import IntervalTree

from aipipe.streams.consumer import SafeSeekConsumer

TP = ("operations.admitted", 3)


def state(acked: list[int], committed: int | None, start: int | None = None) -> Any:
    return SimpleNamespace(
        _acked=defaultdict(list, {TP: list(acked)}),
        _acked_index=defaultdict(set, {TP: set(acked)}),
        _gap=defaultdict(IntervalTree),
        _committed_offset=defaultdict(lambda: None, {TP: committed}),
        _starts={} if start is None else {TP: start},
    )


@pytest.mark.parametrize(
    ("acked", "committed", "start", "faust_commits", "safe_commits"),
    [
        # one message (1067) still being decided, its neighbours acknowledged
        ([1068, 1069], 1067, None, 1070, None),
        # before the first commit, operations 0-3 still running, 4-6 done
        ([4, 5, 6], None, 0, 7, None),
        # committed offset 0 is falsy to faust: the head check is skipped
        ([2, 3], 0, None, 4, None),
        # the ordinary case: a run from the committed offset
        ([1067, 1068, 1070], 1067, None, 1069, 1069),
        ([0, 1, 2], None, 0, 3, 3),
        # before the first commit and before the fetch start is known: wait
        ([0, 1, 2], None, None, 3, None),
    ],
)
def test_a_commit_never_passes_a_message_still_in_flight(
    acked: list[int], committed: int | None, start: int | None,
    faust_commits: int | None, safe_commits: int | None,
) -> None:
    assert FaustConsumer._new_offset(state(acked, committed, start), TP) == faust_commits
    assert SafeSeekConsumer._new_offset(state(acked, committed, start), TP) == safe_commits


def test_the_run_is_consumed_and_the_rest_waits() -> None:
    s = state([10, 11, 13], committed=10)
    assert SafeSeekConsumer._new_offset(s, TP) == 12
    assert s._acked[TP] == [13]
    s._committed_offset[TP] = 12
    assert SafeSeekConsumer._new_offset(s, TP) is None  # 12 still in flight
    s._acked[TP].append(12)
    assert SafeSeekConsumer._new_offset(s, TP) == 14


def test_offsets_the_broker_skipped_are_filled() -> None:
    s = state([5, 6, 9], committed=5)
    s._gap[TP].addi(7, 9)  # 7 and 8 were never returned by the broker
    assert SafeSeekConsumer._new_offset(s, TP) == 10


def test_a_marker_after_the_run_or_at_the_committed_offset_is_passed() -> None:
    """A transaction's marker holds an offset no record is at: after the last
    acknowledgement, or where the partition resumes with nothing acknowledged, the commit
    goes past it (it stayed below it, and the stalled-partition check fetched it again)."""
    s = state([5, 6], committed=5)
    s._gap[TP].addi(7, 8)
    assert SafeSeekConsumer._new_offset(s, TP) == 8
    assert not s._gap[TP]
    s = state([], committed=8)
    s._gap[TP].addi(8, 9)
    assert SafeSeekConsumer._new_offset(s, TP) == 9
    s = state([], committed=8)
    s._gap[TP].addi(9, 10)  # a marker after a record still in flight: wait for it
    assert SafeSeekConsumer._new_offset(s, TP) is None
    assert s._gap[TP]


def test_what_a_fetch_returned_names_the_offsets_without_a_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aipipe.streams import consumer

    consumer.SKIPPED.clear()
    monkeypatch.setattr(consumer, "_noted_topics", frozenset({"requests"}))
    tp = SimpleNamespace(topic="requests", partition=0)
    records = [SimpleNamespace(offset=n) for n in (10, 11, 13, 14)]
    consumer._note_skipped(tp, 10, 17, records)  # 12: a marker; 15 and 16 at the end
    consumer._note_skipped(SimpleNamespace(topic="a-changelog", partition=0), 0, 9, [])
    assert list(consumer.SKIPPED) == [(tp, 12, 13), (tp, 15, 17)]
    consumer.SKIPPED.clear()

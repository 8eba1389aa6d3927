"""The month an archive row is filed under cannot be chosen by a client's occurred_at."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from aipipe.consumers.archive.sink import FILED_AFTER, FILED_BEFORE, archive_row
from aipipe.schemas import OperationRequested, encode

RECORD = datetime(2026, 12, 3, 12, tzinfo=UTC)


def row_for(occurred_at: datetime, record_ms: int = int(RECORD.timestamp() * 1000)) -> datetime:
    event = OperationRequested(request_id="r-1", client_id="acme", occurred_at=occurred_at,
                               operation_type="image_generation",
                               model="gemini-2.5-flash-image", params={"prompt": "p"})
    row = archive_row(encode(event), None, "p.operations.requested", 0, 1, record_ms,
                      "p.deadletter")
    assert row.event_type == "operation.requested"
    assert f'"occurred_at":"{occurred_at.isoformat()[:19]}' in row.payload  # as sent
    return row.occurred_at


@pytest.mark.parametrize("occurred_at", [
    RECORD, RECORD - FILED_BEFORE, RECORD + FILED_AFTER, RECORD - timedelta(days=7),
])
def test_an_event_time_near_its_records_is_kept(occurred_at: datetime) -> None:
    assert row_for(occurred_at) == occurred_at


@pytest.mark.parametrize("occurred_at", [
    datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC),
    RECORD - FILED_BEFORE - timedelta(milliseconds=1), RECORD + FILED_AFTER + timedelta(days=1),
])
def test_one_far_from_it_is_filed_under_the_records_time(occurred_at: datetime) -> None:
    assert row_for(occurred_at) == RECORD


@pytest.mark.parametrize("record_ms", [-1, 0])
def test_a_record_without_a_timestamp_keeps_the_event_time(record_ms: int) -> None:
    when = datetime(2001, 1, 1, tzinfo=UTC)
    assert row_for(when, record_ms=record_ms) == when

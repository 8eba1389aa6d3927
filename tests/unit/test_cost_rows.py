"""The mapping from ``operation.completed`` to a cost row, the DDL that holds it, and the
pure summary arithmetic shared by every cost store."""

from __future__ import annotations

import re
from dataclasses import fields
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest

from aipipe.consumers.costs.migrations import migration_scripts, statements
from aipipe.consumers.costs.rows import COLUMNS, CostRow, row_from_completed, to_millis
from aipipe.consumers.costs.store import Bucket, Group, StoreError, summarize
from aipipe.schemas.events import OperationCompleted, Usage

REQUESTED = datetime(2025, 11, 3, 23, 59, 59, 999_999, tzinfo=UTC)
# 01:00:00.123456 at +02:00 is 23:00:00.123456 UTC on the day before
COMPLETED = datetime(2025, 11, 4, 1, 0, 0, 123_456, tzinfo=timezone(timedelta(hours=2)))
CLIENT_CLOCK = datetime(2025, 6, 1, 12, 0, 0, 456_789, tzinfo=UTC)  # backdated: never bills


def completed(**changes: object) -> OperationCompleted:
    fields_: dict[str, object] = {
        "event_id": "evt-1",
        "occurred_at": COMPLETED,
        "request_id": "req-1",
        "client_id": "acme",
        "user_id": "u-7",
        "job_id": "job-3",
        "operation_id": "op-1",
        "requested_at": REQUESTED,
        "operation_type": "video_generation",
        "provider": "gemini",
        "model": "veo-3.0-generate-001",
        "success": True,
        "usage": Usage(video_seconds=Decimal("8.5")),
        "cost_usd": Decimal("3.400000000"),
        "price_version": "2025-10-01",
        "duration_ms": 61_250,
        "poll_count": 7,
        "metadata": {"resolution": "720p", "aspect": "16:9", "n": 1},
        "client_occurred_at": CLIENT_CLOCK,
    }
    fields_.update(changes)
    return OperationCompleted(**fields_)  # type: ignore[arg-type]


def test_every_field_maps_from_the_event() -> None:
    row = row_from_completed(completed(), "aipipe.operations.completed", 3, 1041)

    assert row == CostRow(
        operation_id="op-1",
        event_id="evt-1",
        client_id="acme",
        user_id="u-7",
        request_id="req-1",
        job_id="job-3",
        operation_type="video_generation",
        provider="gemini",
        model="veo-3.0-generate-001",
        cost_usd=Decimal("3.400000000"),
        price_version="2025-10-01",
        input_tokens=None,
        output_tokens=None,
        image_count=None,
        video_duration_seconds=Decimal("8.5"),
        poll_count=7,
        metadata='{"aspect":"16:9","n":1,"resolution":"720p"}',
        success=True,
        error_message=None,
        duration_ms=61_250,
        requested_at=datetime(2025, 11, 3, 23, 59, 59, 999_000, tzinfo=UTC),
        created_at=datetime(2025, 11, 3, 23, 0, 0, 123_000, tzinfo=UTC),
        kafka_topic="aipipe.operations.completed",
        kafka_partition=3,
        kafka_offset=1041,
        client_occurred_at=datetime(2025, 6, 1, 12, 0, 0, 456_000, tzinfo=UTC),
    )


def test_an_event_from_before_client_occurred_at_maps_to_null() -> None:
    assert row_from_completed(completed(client_occurred_at=None), "t", 0, 0).client_occurred_at \
        is None


def test_a_failed_text_operation_keeps_tokens_and_error() -> None:
    event = completed(
        operation_type="text_generation",
        model="gemini-2.5-flash",
        success=False,
        usage=Usage(input_tokens=1200, output_tokens=0),
        cost_usd=Decimal("0.000360000"),
        error_message="provider timed out",
        user_id=None,
        job_id=None,
        metadata={},
    )
    row = row_from_completed(event, "t", 0, 0)

    assert (row.input_tokens, row.output_tokens, row.image_count) == (1200, 0, None)
    assert row.video_duration_seconds is None
    assert (row.success, row.error_message) == (False, "provider timed out")
    assert (row.user_id, row.job_id, row.metadata) == (None, None, "{}")


def test_metadata_is_json_text_that_round_trips() -> None:
    metadata = {"prompt_chars": 42, "tags": ["a", "b"], "nested": {"x": None}}
    row = row_from_completed(completed(metadata=metadata), "t", 0, 0)

    assert orjson.loads(row.metadata) == metadata


def test_times_are_utc_to_the_millisecond() -> None:
    assert to_millis(COMPLETED) == datetime(2025, 11, 3, 23, 0, 0, 123_000, tzinfo=UTC)
    assert to_millis(to_millis(COMPLETED)) == to_millis(COMPLETED)


def test_columns_follow_the_dataclass_and_the_table() -> None:
    assert fields(CostRow)[0].name == "operation_id"
    assert tuple(f.name for f in fields(CostRow)) == COLUMNS
    assert len(COLUMNS) == 28

    scripts = dict(migration_scripts())
    create_table = next(s for s in statements(scripts["0001_ai_cost_tracking.sql"], "db")
                        if "ai_cost_tracking" in s)
    table_columns = re.findall(r"^\s{4}(\w+)\s", create_table, flags=re.MULTILINE)
    # columns added later go in before ingested_at (ALTER TABLE ... AFTER)
    added = [re.search(r"ADD COLUMN IF NOT EXISTS (\w+) .* AFTER (\w+)", s)
             for sql in scripts.values() for s in statements(sql, "db")
             if "ai_cost_tracking" in s and "ADD COLUMN" in s]
    for match in added:
        assert match is not None
        table_columns.insert(table_columns.index(match[2]) + 1, match[1])
    assert tuple(table_columns) == (*COLUMNS, "ingested_at")


def test_migration_statements_fill_in_the_database() -> None:
    (name, ddl), *_ = migration_scripts()
    stmts = statements(ddl, "costs_1")

    assert name == "0001_ai_cost_tracking.sql"
    assert stmts[0] == "CREATE DATABASE IF NOT EXISTS `costs_1`"
    assert stmts[1].startswith("CREATE TABLE IF NOT EXISTS `costs_1`.ai_cost_tracking")
    assert all("--" not in s and "{database}" not in s for s in stmts)
    assert "ReplacingMergeTree(ingested_at)" in stmts[1]
    assert "non_replicated_deduplication_window = 1000" in stmts[1]


@pytest.mark.parametrize("bad", ["", "a-b", "x; DROP TABLE y", "`q`", "1st"])
def test_a_database_name_that_is_not_an_identifier_is_refused(bad: str) -> None:
    with pytest.raises(StoreError, match="not a plain identifier"):
        statements("CREATE DATABASE {database}", bad)


def test_summarize_adds_groups_into_exact_buckets() -> None:
    day1, day2 = date(2025, 11, 1), date(2025, 11, 2)
    groups = [
        Group("image_generation", "img", day1, True, 3, Decimal("0.117")),
        Group("image_generation", "img", day2, False, 1, Decimal("0")),
        Group("video_generation", "veo", day2, True, 2, Decimal("6.400000001")),
        Group("text_generation", "txt", day1, True, 5, Decimal("0.000000003")),
    ]
    s = summarize("acme", None, None, groups)

    assert s.total_cost_usd == Decimal("6.517000004")
    assert (s.operation_count, s.success_count, s.failure_count) == (11, 10, 1)
    assert s.by_operation_type == {
        "image_generation": Bucket(4, Decimal("0.117")),
        "video_generation": Bucket(2, Decimal("6.400000001")),
        "text_generation": Bucket(5, Decimal("0.000000003")),
    }
    assert s.by_model["veo"] == Bucket(2, Decimal("6.400000001"))
    assert s.by_day == {
        day1: Bucket(8, Decimal("0.117000003")),
        day2: Bucket(3, Decimal("6.400000001")),
    }


def test_summary_json_has_decimal_strings_with_nine_places() -> None:
    start = datetime(2025, 11, 1, tzinfo=UTC)
    s = summarize(
        "acme",
        start,
        None,
        [Group("image_generation", "img", date(2025, 11, 1), True, 1, Decimal("0.039"))],
    )
    out = s.to_json()

    assert out["total_cost_usd"] == "0.039000000"
    assert out["start"] == "2025-11-01T00:00:00+00:00" and out["end"] is None
    assert out["by_day"] == {"2025-11-01": {"count": 1, "cost_usd": "0.039000000"}}
    assert out["by_model"] == {"img": {"count": 1, "cost_usd": "0.039000000"}}
    assert orjson.loads(orjson.dumps(out)) == out


def test_an_empty_summary_is_zero() -> None:
    s = summarize("nobody", None, None, [])

    assert (s.operation_count, s.total_cost_usd) == (0, Decimal(0))
    assert s.to_json()["total_cost_usd"] == "0.000000000"

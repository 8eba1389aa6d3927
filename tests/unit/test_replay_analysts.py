"""Pure parts of the analyst tools: ``aipipe sql``'s read-only check and output, archive rows."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from aipipe.consumers.archive.sink import archive_row
from aipipe.schemas.deadletter import REASON
from aipipe.schemas.events import BudgetSet, OperationRejected, OperationRequested, encode
from aipipe.sqlcmd import SqlError, checked, render

T = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(("sql", "message"), [
    ("INSERT INTO ai_cost_tracking VALUES (1)", "INSERT would change data"),
    ("  drop table ai_cost_tracking", "DROP would change data"),
    ("ALTER TABLE t DELETE WHERE 1", "ALTER would change data"),
    ("SELECT 1; DROP TABLE t", "Multi-statements"),
    ("SELECT 1 INTO OUTFILE 'x'", "INTO OUTFILE"),
    ("SELECT 1 FORMAT JSON", "--format"),
])
def test_sql_refuses_anything_but_one_read(sql: str, message: str) -> None:
    with pytest.raises(SqlError, match=message):
        checked(sql)


def test_sql_lets_reads_through_and_renders_them() -> None:
    assert checked("WITH 1 AS x SELECT x") == "WITH 1 AS x SELECT x"
    rows = [["acme", Decimal("1.500000000"), date(2026, 11, 2), None]]
    columns = ["client", "cost", "day", "user"]
    assert render(columns, rows, "csv") == "client,cost,day,user\nacme,1.500000000,2026-11-02,"
    assert json.loads(render(columns, rows, "json")) == [
        {"client": "acme", "cost": "1.500000000", "day": "2026-11-02", "user": None}]
    assert render(columns, rows, "tsv").splitlines()[1] == "acme\t1.500000000\t2026-11-02\t"


def test_an_event_is_archived_with_its_envelope_and_coordinates() -> None:
    event = OperationRejected(request_id="r1", client_id="acme", operation_id="op-1",
                              requested_at=T, occurred_at=T, operation_type="image_generation",
                              model="m", reason="over_budget")
    row = archive_row(encode(event), None, "p.operations.rejected", 2, 41,
                      int(T.timestamp() * 1000) + 7, "p.deadletter")
    assert (row.event_id, row.event_type, row.client_id, row.request_id, row.operation_id) == (
        event.event_id, "operation.rejected", "acme", "r1", "op-1")
    assert row.occurred_at == T and json.loads(row.payload)["reason"] == "over_budget"
    assert (row.kafka_topic, row.kafka_partition, row.kafka_offset) == (
        "p.operations.rejected", 2, 41)


def test_a_request_is_archived_under_its_own_id_and_a_budget_under_none() -> None:
    # neither event type has an operation_id field: a request's operation is its event id
    request = OperationRequested(request_id="r2", client_id="acme", occurred_at=T,
                                 operation_type="image_generation", model="m")
    budget = BudgetSet(request_id="r3", client_id="acme", occurred_at=T, amount_usd="5")
    rows = [archive_row(encode(e), None, "p.t", 0, n, 0, "p.deadletter")
            for n, e in enumerate((request, budget))]
    assert [(r.event_type, r.operation_id) for r in rows] == [
        ("operation.requested", request.event_id), ("budget.set", "")]


def test_invalid_and_dead_lettered_messages_are_archived_by_coordinates() -> None:
    bad = archive_row(b'{"client_id": "acme"', None, "p.operations.requested", 0, 7, 0,
                      "p.deadletter")
    assert (bad.event_type, bad.event_id, bad.client_id) == (
        "invalid", "p.operations.requested:0:7", "")
    assert "not valid JSON" in bad.deadletter_reason
    dead = archive_row(b'{"client_id": "acme"}', [(REASON, b"Field 'model' is missing")],
                       "p.deadletter", 1, 3, 0, "p.deadletter")
    assert (dead.event_type, dead.client_id, dead.deadletter_reason) == (
        "deadletter", "acme", "Field 'model' is missing")

"""Budget as of a past time: what the spend was at ``T``, from the log's own record.

Bitemporal: an operation counts when its cost was incurred in the period up to ``T``
(``created_at`` in ``[period start, T)``) *and* the log held it at ``T`` (its offset on
the completed topic is before the first offset Kafka timestamped at or after ``T``). So
an operation recorded late, or backdated, counts from when the log had it, as the
admission gate could have known it then. Copies of an operation are resolved to the
latest one the log held at ``T`` (``argMax`` over the offset; one client's copies share a
partition), not to whatever arrived since. The budget is the latest one set before ``T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from aipipe.consumers.costs.budgets import Budget, budget_verdict, period_bounds, resolve_budget
from aipipe.consumers.costs.rows import to_millis
from aipipe.consumers.costs.store import database_name
from aipipe.consumers.replay.replay import Range
from aipipe.schemas.events import BudgetPeriod
from aipipe.schemas.prices import COST_QUANTUM


def _time(moment: datetime) -> str:
    return to_millis(moment).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def offsets_condition(topic: str, ranges: Sequence[Range]) -> tuple[str, dict[str, Any]]:
    parts = [f"(kafka_partition = {int(r.partition)} AND kafka_offset < {int(r.end)})"
             for r in ranges]
    return (f"kafka_topic = {{topic:String}} AND ({' OR '.join(parts) or '0'})",
            {"topic": topic})


def spend_as_of(client: Any, database: str, topic: str, ranges: Sequence[Range],
                client_id: str, start: datetime, as_of: datetime) -> Decimal:
    held, params = offsets_condition(topic, ranges)
    sql = (
        "SELECT sum(cost) FROM (SELECT operation_id, argMax(cost_usd, kafka_offset) AS cost, "
        "argMax(created_at, kafka_offset) AS created "
        f"FROM `{database_name(database)}`.ai_cost_tracking "
        f"WHERE client_id = {{client:String}} AND {held} GROUP BY operation_id, admitted_at) "
        "WHERE created >= {start:DateTime64(3, 'UTC')} AND created < {end:DateTime64(3, 'UTC')}"
    )
    rows = client.query(sql, parameters={**params, "client": client_id, "start": _time(start),
                                         "end": _time(as_of)}).result_rows
    return Decimal(rows[0][0] or 0).quantize(COST_QUANTUM)


def budget_as_of(client: Any, database: str, client_id: str, as_of: datetime) -> Budget | None:
    rows = client.query(
        f"SELECT argMax(amount_usd, set_at), argMax(period, set_at), count() "
        f"FROM `{database_name(database)}`.client_budgets "
        "WHERE client_id = {client:String} AND set_at <= {at:DateTime64(3, 'UTC')}",
        parameters={"client": client_id, "at": _time(as_of)},
    ).result_rows
    if not rows or not rows[0][2]:
        return None
    amount, period, _ = rows[0]
    return Budget(Decimal(amount).quantize(COST_QUANTUM), period, "table")


def budget_report_as_of(
    client: Any, database: str, topic: str, ranges: Sequence[Range], client_id: str,
    as_of: datetime, default: Decimal | None, default_period: BudgetPeriod,
    override: Decimal | None = None,
) -> dict[str, Any]:
    """What ``aipipe budget check --as-of T`` shows (the fields of ``budget check``)."""
    budget = resolve_budget(lambda: budget_as_of(client, database, client_id, as_of), default,
                            default_period, override)
    period: BudgetPeriod = budget.period if budget is not None else default_period
    start, end = period_bounds(period, as_of)
    spend = spend_as_of(client, database, topic, ranges, client_id, start, as_of)
    return {
        **budget_verdict(client_id, budget, period, (start, end), spend),
        "as_of": as_of.isoformat(),
        "log_offsets": {str(r.partition): r.end for r in ranges},
    }

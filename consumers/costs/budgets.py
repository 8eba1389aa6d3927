"""Client budgets in ClickHouse: the projection of ``budget.set`` events, and spend per period.

``aipipe budget set`` emits a ``budget.set`` event to the budgets topic; ``BudgetProjector``
(run next to the cost sink, in the process that owns ClickHouse) writes it into
``client_budgets``. So a budget is set the same way whether ClickHouse is embedded chDB
(whose read endpoint refuses writes) or a server, and the Kafka log can rebuild the table.
Readers (admission, the CLI) ask ``BudgetStore`` through any read-only client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from clickhouse_connect.driver.exceptions import ClickHouseError
from confluent_kafka import Message

from aipipe.consumers.costs.rows import to_millis
from aipipe.consumers.costs.store import StoreError, database_name
from aipipe.consumers.sink import BatchingSink
from aipipe.schemas.errors import EventDecodeError
from aipipe.schemas.events import BudgetPeriod, BudgetSet, BudgetThresholdCrossed, decode
from aipipe.schemas.prices import COST_QUANTUM

TABLE = "client_budgets"
log = structlog.get_logger("aipipe.budgets")
# clickhouse-connect sends long bind parameters as form fields, which ClickHouse (and the
# embedded read endpoint) cap at 128 KiB each: clients are asked for in lists well below it
CLIENTS_PER_QUERY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Budget:
    amount_usd: Decimal
    period: BudgetPeriod
    source: str  # "table" (aipipe budget set) or "settings" (AIPIPE_BUDGET_USD)


THRESHOLDS = (80, 90, 100)


def thresholds_reached(spend: Decimal, budget: Decimal) -> list[int]:
    """The thresholds (percent of ``budget``) that ``spend`` has reached."""
    return [t for t in THRESHOLDS if spend * 100 >= budget * t]


def resolve_budget(
    stored: Callable[[], Budget | None], default: Decimal | None,
    default_period: BudgetPeriod, override: Decimal | None = None,
) -> Budget | None:
    """The budget that applies: ``--limit``, else the stored one, else the settings'."""
    if override is not None:
        return Budget(override, default_period, "--limit")
    budget = stored()
    if budget is None and default is not None:
        budget = Budget(default, default_period, "settings")
    return budget


def budget_verdict(
    client_id: str, budget: Budget | None, period: BudgetPeriod,
    bounds: tuple[datetime, datetime], spend: Decimal,
) -> dict[str, Any]:
    """What ``aipipe budget check`` shows: spend, budget, thresholds and the decision."""
    over = budget is not None and spend >= budget.amount_usd
    return {
        "client_id": client_id,
        "period": period,
        "period_start": bounds[0].isoformat(),
        "period_end": bounds[1].isoformat(),
        "spend_usd": str(spend),
        "budget_usd": None if budget is None else str(budget.amount_usd),
        "budget_source": None if budget is None else budget.source,
        "remaining_usd": None if budget is None else str(budget.amount_usd - spend),
        "thresholds_reached": [] if budget is None
        else thresholds_reached(spend, budget.amount_usd),
        "over_budget": over,
        "decision": "reject: over_budget" if over else "admit",
    }


def period_bounds(period: BudgetPeriod, now: datetime) -> tuple[datetime, datetime]:
    """The UTC period containing ``now``: ``[start, end)``; weeks start on Monday."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def _param_time(moment: datetime) -> str:
    return to_millis(moment).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def client_chunks(clients: Sequence[str],
                  max_bytes: int = CLIENTS_PER_QUERY_BYTES) -> Iterator[list[str]]:
    """``clients`` in order, in lists whose bound array literal stays within ``max_bytes``."""
    chunk: list[str] = []
    size = 0
    for client in clients:
        cost = 2 * len(client.encode()) + 4  # quoted, every byte escaped at worst, ", "
        if chunk and size + cost > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(client)
        size += cost
    if chunk:
        yield chunk


class BudgetStore:
    """Budgets set per client and spend per client, read from ClickHouse (``FINAL``)."""

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.database = database_name(database)

    def _query(self, sql: str, what: str, **params: Any) -> list[Any]:
        try:
            return list(self.client.query(sql, parameters=params).result_rows)
        except ClickHouseError as exc:
            raise StoreError(f"ClickHouse could not {what}: {exc}") from exc

    def budgets(self, client_ids: Iterable[str] | None = None) -> dict[str, Budget]:
        """The latest budget set for each client (only ``client_ids`` if given)."""
        select = (f"SELECT client_id, argMax(amount_usd, set_at), argMax(period, set_at) "
                  f"FROM `{self.database}`.{TABLE} FINAL")
        if client_ids is None:
            rows = self._query(f"{select} GROUP BY client_id", "read the client budgets")
        else:
            rows = [row for chunk in client_chunks(sorted(set(client_ids))) for row in self._query(
                f"{select} WHERE client_id IN {{clients:Array(String)}} GROUP BY client_id",
                "read the client budgets", clients=chunk)]
        return {c: Budget(Decimal(a).quantize(COST_QUANTUM), p, "table") for c, a, p in rows}

    def spend(
        self, client_ids: Iterable[str], start: datetime, end: datetime
    ) -> dict[str, Decimal]:
        """Spend per client over ``[start, end)`` of ``created_at``; 0 for no rows."""
        clients = sorted(set(client_ids))
        rows = [row for chunk in client_chunks(clients) for row in self._query(
            f"SELECT client_id, sum(cost_usd) FROM `{self.database}`.ai_cost_tracking FINAL "
            "WHERE client_id IN {clients:Array(String)} "
            "AND created_at >= {start:DateTime64(3, 'UTC')} "
            "AND created_at < {end:DateTime64(3, 'UTC')} GROUP BY client_id",
            "sum the spend per client", clients=chunk, start=_param_time(start),
            end=_param_time(end))]
        found = {c: Decimal(s).quantize(COST_QUANTUM) for c, s in rows}
        return {c: found.get(c, Decimal(0).quantize(COST_QUANTUM)) for c in clients}

    def write(self, events: Iterable[BudgetSet]) -> int:
        rows = [[e.client_id, e.amount_usd, e.period, to_millis(e.occurred_at), e.event_id]
                for e in events]
        if not rows:
            return 0
        try:
            self.client.insert(
                TABLE, rows, column_names=["client_id", "amount_usd", "period", "set_at",
                                           "event_id"], database=self.database)
        except ClickHouseError as exc:
            raise StoreError(f"ClickHouse could not write {len(rows)} budgets: {exc}") from exc
        return len(rows)


class BudgetProjection:
    """``budget.set`` events become budget rows; other budget events are not projected."""

    stage = "budgets"

    def __init__(self, store: BudgetStore) -> None:
        self.store = store

    def rows(self, message: Message) -> list[BudgetSet]:
        event = decode(message.value())
        if isinstance(event, BudgetThresholdCrossed):  # the topic's other event: no row
            return []
        if not isinstance(event, BudgetSet):
            raise EventDecodeError(
                f"Field 'event_type' is {event.event_type!r} on {message.topic()}, which "
                "carries only budget.set and budget.threshold_crossed events; send it to "
                "its own topic.")
        return [event]

    def write(self, rows: Sequence[BudgetSet], dedup_token: str) -> None:
        self.store.write(rows)
        log.info("budgets_written", count=len(rows))


class BudgetProjector(BatchingSink[BudgetSet]):
    """Consume the budgets topic; write ``budget.set`` events; commit after the write."""

    def __init__(self, *, topic: str, store: BudgetStore, **options: Any) -> None:
        super().__init__(topics=[topic], projection=BudgetProjection(store), **options)

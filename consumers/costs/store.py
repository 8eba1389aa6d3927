"""The cost store: rows in, exact per-client cost out.

``CostStore`` is the port; ``ClickHouseCostStore`` the real adapter (chDB or a server,
through clickhouse-connect) and ``MemoryCostStore`` the in-memory one, held to the same
contract: one row per ``(client_id, operation_id)``, the last write winning; a write
repeated with the same deduplication token stored once; sums exact to the nano-dollar;
ranges half-open, ``[start, end)``, on ``created_at`` (when the cost was incurred).
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from operator import attrgetter
from typing import Any, NamedTuple, Protocol, TypeVar

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from aipipe.consumers.costs.rows import COLUMNS, LEGACY_RUN, CostRow, run_key, to_millis
from aipipe.schemas.errors import AipipeError
from aipipe.schemas.prices import COST_QUANTUM

TABLE = "ai_cost_tracking"
ROLLUP_STATE = "ai_cost_daily_state"  # the rollup's change counts (0011_cost_rollups.sql)
RUN_KEYS = "ai_cost_run_keys"  # until when rows keep the key they had before 0016
_DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEDUP_WINDOW = 1000  # the table's non_replicated_deduplication_window


class StoreError(AipipeError):
    """ClickHouse refused a write or a query; the cause is chained."""


def database_name(database: str) -> str:
    """``database`` if it is a plain identifier, safe to put in SQL; else ``StoreError``."""
    if not _DATABASE_NAME.match(database):
        raise StoreError(
            f"Database name {database!r} is not a plain identifier; use letters, digits "
            "and underscores (AIPIPE_CLICKHOUSE_DATABASE)."
        )
    return database


@dataclass(frozen=True, slots=True)
class Bucket:
    """Operations counted once each, and their exact cost."""

    count: int = 0
    cost_usd: Decimal = Decimal(0)

    def plus(self, count: int, cost_usd: Decimal) -> Bucket:
        return Bucket(self.count + count, self.cost_usd + cost_usd)


@dataclass(frozen=True)
class CostSummary:
    """One client's cost over ``[start, end)`` (``None``: unbounded), in total and split."""

    client_id: str
    start: datetime | None
    end: datetime | None
    total_cost_usd: Decimal
    operation_count: int
    success_count: int
    failure_count: int
    by_operation_type: dict[str, Bucket] = field(default_factory=dict)
    by_model: dict[str, Bucket] = field(default_factory=dict)
    by_day: dict[date, Bucket] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: decimals as strings with nine places, times in ISO 8601."""

        def buckets(items: dict[Any, Bucket]) -> dict[str, dict[str, Any]]:
            return {
                str(key): {"count": b.count, "cost_usd": _money_text(b.cost_usd)}
                for key, b in sorted(items.items())
            }

        return {
            "client_id": self.client_id,
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "total_cost_usd": _money_text(self.total_cost_usd),
            "operation_count": self.operation_count,
            "success_count": self.success_count,
            "failure_count": self.failure_count,
            "by_operation_type": buckets(self.by_operation_type),
            "by_model": buckets(self.by_model),
            "by_day": buckets(self.by_day),
        }


class Group(NamedTuple):
    """Operations sharing type, model, day and outcome: what both adapters aggregate to."""

    operation_type: str
    model: str
    day: date
    success: bool
    operations: int
    cost_usd: Decimal


class CostStore(Protocol):
    def write(self, rows: Sequence[CostRow], dedup_token: str) -> None: ...

    def summary(
        self, client_id: str, start: datetime | None = None, end: datetime | None = None
    ) -> CostSummary: ...

    def spend(self, client_id: str, start: datetime, end: datetime) -> Decimal: ...

    def totals(self) -> dict[str, tuple[int, Decimal]]:
        """Per client: operations counted once each, and their exact cost."""
        ...


def summarize(
    client_id: str, start: datetime | None, end: datetime | None, groups: Iterable[Group]
) -> CostSummary:
    by_type: dict[str, Bucket] = defaultdict(Bucket)
    by_model: dict[str, Bucket] = defaultdict(Bucket)
    by_day: dict[date, Bucket] = defaultdict(Bucket)
    total, succeeded, failed = Decimal(0), 0, 0
    for g in groups:
        by_type[g.operation_type] = by_type[g.operation_type].plus(g.operations, g.cost_usd)
        by_model[g.model] = by_model[g.model].plus(g.operations, g.cost_usd)
        by_day[g.day] = by_day[g.day].plus(g.operations, g.cost_usd)
        total += g.cost_usd
        if g.success:
            succeeded += g.operations
        else:
            failed += g.operations
    return CostSummary(
        client_id=client_id,
        start=start,
        end=end,
        total_cost_usd=_money(total),
        operation_count=succeeded + failed,
        success_count=succeeded,
        failure_count=failed,
        by_operation_type=_money_buckets(by_type),
        by_model=_money_buckets(by_model),
        by_day=_money_buckets(by_day),
    )


def _money(value: Decimal) -> Decimal:
    return value.quantize(COST_QUANTUM)


def _money_text(value: Decimal) -> str:
    return format(_money(value), "f")


_K = TypeVar("_K")


def _money_buckets(buckets: dict[_K, Bucket]) -> dict[_K, Bucket]:
    return {key: Bucket(b.count, _money(b.cost_usd)) for key, b in buckets.items()}


# -- ClickHouse --------------------------------------------------------------------------

_row_values = attrgetter(*COLUMNS)
assert COLUMNS[-1] == "admitted_at"  # written as its run_key


@contextmanager
def _wrapped(action: str) -> Iterator[None]:
    try:
        yield
    except ClickHouseError as exc:
        raise StoreError(f"ClickHouse could not {action}: {exc}") from exc


def _param_time(moment: datetime) -> str:
    return to_millis(moment).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


RollupKey = tuple[int, str, str, str]  # a time in its day (epoch ms), client, type, model


def _day_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def _buckets_of(rows: Sequence[CostRow]) -> list[RollupKey]:
    """The rollup buckets of ``rows``, each named by its ``requested_at``: ClickHouse
    takes its day (``toDate``) as the materialized view does, also for a time past the
    ``Date`` range, which a day computed here would not be."""
    return sorted({(int(r.requested_at.timestamp() * 1000), r.client_id, r.operation_type,
                    r.model) for r in rows})


class ClickHouseCostStore:
    """``ai_cost_tracking`` in ``database``, read with ``FINAL`` so duplicates never count."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.database = database_name(database)
        self.table = f"`{database}`.{TABLE}"
        self._legacy: datetime | None = None

    def write(self, rows: Sequence[CostRow], dedup_token: str) -> None:
        if not rows:
            return
        # A touched bucket's `rows` moves, so the views answer it from the raw table until
        # it is sealed again. Each bucket written to is touched before the insert: the
        # materialized view counts the rows only after the table has them, and in between
        # a sealed bucket was answered from a seal that missed a replaced row. And an
        # operation re-run after a crash may have a row already in another bucket (its first
        # run completed on a fallback model): once this row replaces it, that bucket's seal
        # would still count it, so it is touched before the insert and after it, so a seal
        # taken in between is not trusted either.
        moved = self._buckets_left([row for row in rows if row.attempt > 1])
        with _wrapped(f"insert {len(rows)} rows into {self.table}"):
            self._touch(sorted({*moved, *_buckets_of(rows)}))
            legacy_until = self._legacy_until()
            self.client.insert(
                TABLE,
                [(*_row_values(row)[:-1], run_key(row.requested_at, legacy_until))
                 for row in rows],
                column_names=list(COLUMNS),
                database=self.database,
                settings={"insert_deduplication_token": dedup_token},
            )
        with _wrapped(f"mark {len(moved)} rollup buckets changed"):
            self._touch(moved)

    def _legacy_until(self) -> datetime:
        """The latest ``requested_at`` stored before migration 0016 (read once)."""
        if self._legacy is None:
            sql = f"SELECT max(legacy_until) FROM `{self.database}`.{RUN_KEYS}"
            found = self.client.query(sql).result_rows
            at = found[0][0] if found else None
            self._legacy = LEGACY_RUN if at is None else to_millis(
                at if at.tzinfo else at.replace(tzinfo=UTC))
        return self._legacy

    def _buckets_left(self, reruns: Sequence[CostRow]) -> list[RollupKey]:
        """The rollup buckets ``(day, client, type, model)`` where an earlier row of one of
        ``reruns`` lies, other than the re-run's own (every copy still stored, merged or not:
        one key lookup per re-run, and re-runs are rare)."""
        if not reruns:
            return []
        sql = (f"SELECT DISTINCT client_id, operation_id, toDate(requested_at), "
               f"operation_type, model FROM {self.table} "
               "WHERE (client_id, operation_id) IN {keys:Array(Tuple(String, String))}")
        keys = sorted({(r.client_id, r.operation_id) for r in reruns})
        with _wrapped(f"look up the earlier rows of {len(keys)} re-run operations"):
            found = self.client.query(sql, parameters={"keys": keys}).result_rows
        own = {(r.client_id, r.operation_id): (r.requested_at.date(), r.operation_type, r.model)
               for r in reruns}
        left = {(day, client, kind, model) for client, op, day, kind, model in found
                if own.get((client, op)) not in (None, (day, kind, model))}
        return [(_day_ms(day), client, kind, model) for day, client, kind, model in sorted(left)]

    def _touch(self, buckets: Sequence[RollupKey]) -> None:
        """Add 1 to the ``rows`` of each bucket in ``ai_cost_daily_state`` (only that)."""
        if not buckets:
            return
        self.client.command(
            f"INSERT INTO `{self.database}`.{ROLLUP_STATE} (day, client_id, operation_type, "
            "model, rows, successes, cost_usd, duration_ms) "
            "SELECT toDate(fromUnixTimestamp64Milli(b.1, 'UTC')), b.2, b.3, b.4, 1, 0, 0, 0 "
            "FROM (SELECT arrayJoin({buckets:Array(Tuple(Int64, String, String, String))}) "
            "AS b)",
            parameters={"buckets": list(buckets)},
            # each touch counts: a replicated table (a cluster) would drop a second
            # identical block as a retry of the first
            settings={"insert_deduplication_token": f"touch-{uuid.uuid4()}"},
        )

    def _where(
        self, client_id: str, start: datetime | None, end: datetime | None
    ) -> tuple[str, dict[str, Any]]:
        conditions = ["client_id = {client_id:String}"]
        params: dict[str, Any] = {"client_id": client_id}
        if start is not None:
            conditions.append("created_at >= {start:DateTime64(3, 'UTC')}")
            params["start"] = _param_time(start)
        if end is not None:
            conditions.append("created_at < {end:DateTime64(3, 'UTC')}")
            params["end"] = _param_time(end)
        return " AND ".join(conditions), params

    def summary(
        self, client_id: str, start: datetime | None = None, end: datetime | None = None
    ) -> CostSummary:
        where, params = self._where(client_id, start, end)
        sql = (
            "SELECT operation_type, model, toDate(created_at) AS day, success, "
            f"count() AS operations, sum(cost_usd) AS cost FROM {self.table} FINAL "
            f"WHERE {where} GROUP BY operation_type, model, day, success"
        )
        with _wrapped(f"summarize costs of client {client_id!r}"):
            rows = self.client.query(sql, parameters=params).result_rows
        return summarize(client_id, start, end, (Group(*row) for row in rows))

    def spend(self, client_id: str, start: datetime, end: datetime) -> Decimal:
        where, params = self._where(client_id, start, end)
        sql = f"SELECT sum(cost_usd) FROM {self.table} FINAL WHERE {where}"
        with _wrapped(f"sum the spend of client {client_id!r}"):
            rows = self.client.query(sql, parameters=params).result_rows
        return _money(rows[0][0])

    def totals(self) -> dict[str, tuple[int, Decimal]]:
        sql = f"SELECT client_id, count(), sum(cost_usd) FROM {self.table} FINAL GROUP BY client_id"
        with _wrapped("total the costs per client"):
            rows = self.client.query(sql).result_rows
        return {client: (count, _money(cost)) for client, count, cost in rows}


# -- in memory ---------------------------------------------------------------------------


class MemoryCostStore:
    """The same contract in a dict, for tests of the logic around the store."""

    def __init__(self) -> None:
        # one row per run, as ai_cost_tracking's sorting key (its latest copy)
        self.rows: dict[tuple[str, str, datetime | None], CostRow] = {}
        self._tokens: OrderedDict[str, None] = OrderedDict()

    def write(self, rows: Sequence[CostRow], dedup_token: str) -> None:
        if not rows or dedup_token in self._tokens:
            return
        self._tokens[dedup_token] = None
        if len(self._tokens) > DEDUP_WINDOW:
            self._tokens.popitem(last=False)
        for row in rows:
            self.rows[(row.client_id, row.operation_id, row.admitted_at)] = row

    def _selected(
        self, client_id: str, start: datetime | None, end: datetime | None
    ) -> Iterator[CostRow]:
        low = to_millis(start) if start is not None else None
        high = to_millis(end) if end is not None else None
        for row in self.rows.values():
            created = to_millis(row.created_at)
            if (
                row.client_id == client_id
                and (low is None or created >= low)
                and (high is None or created < high)
            ):
                yield row

    def summary(
        self, client_id: str, start: datetime | None = None, end: datetime | None = None
    ) -> CostSummary:
        groups = (
            Group(
                r.operation_type, r.model, to_millis(r.created_at).date(), r.success, 1, r.cost_usd
            )
            for r in self._selected(client_id, start, end)
        )
        return summarize(client_id, start, end, groups)

    def spend(self, client_id: str, start: datetime, end: datetime) -> Decimal:
        return _money(sum((r.cost_usd for r in self._selected(client_id, start, end)), Decimal(0)))

    def totals(self) -> dict[str, tuple[int, Decimal]]:
        out: dict[str, Bucket] = defaultdict(Bucket)
        for row in self.rows.values():
            out[row.client_id] = out[row.client_id].plus(1, row.cost_usd)
        return {client: (b.count, _money(b.cost_usd)) for client, b in out.items()}

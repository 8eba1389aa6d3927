"""Sealing the daily rollups: exact per-bucket values for closed days (see 0011_cost_rollups.sql).

``Sealer`` runs in the process that owns ClickHouse. For every bucket of a day before
today (UTC) that has no seal, or whose ``rows`` changed since its seal, it reads the
bucket's ``rows``, computes the bucket from ``ai_cost_tracking FINAL``, reads ``rows``
again, and seals the buckets whose ``rows`` did not move in between, with that count. The
view trusts a seal only while the count still matches, so a row that arrives at any
moment sends its bucket back to the raw table until the next seal.

A failed round is retried at the next one. A fatal engine error (see
``aipipe.consumers.sink.classify``), or ``max_failures`` failed rounds in a row, raise
``RollupSealError`` out of ``run``: its supervisor then takes the process down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from operator import itemgetter
from typing import Any, TypeVar

import structlog

from aipipe.consumers.costs.rows import to_millis
from aipipe.consumers.costs.store import database_name
from aipipe.consumers.sink import FailureKind, classify
from aipipe.infra.metrics import HEALTH
from aipipe.schemas.errors import AipipeError

log = structlog.get_logger("aipipe.rollups")
Key = tuple[str, date, str, str]
# the sealed table is partitioned by month, and ClickHouse refuses an insert that spans
# more than max_partitions_per_insert_block (100) of them: history can span more
MONTHS_PER_INSERT = 50


R = TypeVar("R")


def by_months(rows: Sequence[R], months: int,
              day: Callable[[R], date] = itemgetter(0)  # type: ignore[assignment]
              ) -> Iterator[list[R]]:
    """``rows`` in chunks of at most ``months`` months of their ``day`` (by default their
    first value): ClickHouse refuses an insert into more than 100 partitions."""
    chunk: list[R] = []
    seen: set[tuple[int, int]] = set()
    for row in sorted(rows, key=day):
        month = (day(row).year, day(row).month)
        if month not in seen and len(seen) == months:
            yield chunk
            chunk, seen = [], set()
        seen.add(month)
        chunk.append(row)
    if chunk:
        yield chunk


class RollupSealError(AipipeError):
    """Sealing cannot go on: the engine is unusable, or every round has failed for a while."""


class Sealer:
    def __init__(self, client: Any, database: str, interval: float = 60.0,
                 today: Callable[[], date] = lambda: datetime.now(UTC).date(),
                 max_failures: int = 10) -> None:
        self.client = client
        self.db = f"`{database_name(database)}`"
        self.interval = interval
        self.today = today
        self.max_failures = max_failures

    def _rows(self, before: date) -> dict[Key, int]:
        sql = (
            "SELECT st.client_id, st.day, st.operation_type, st.model, st.rows "
            "FROM (SELECT client_id, day, operation_type, model, sum(rows) AS rows "
            f"FROM {self.db}.ai_cost_daily_state WHERE day < {{before:Date}} "
            "GROUP BY client_id, day, operation_type, model) AS st "
            "LEFT JOIN (SELECT client_id, day, operation_type, model, "
            "argMax(rows_at_seal, sealed_at) AS sealed "
            f"FROM {self.db}.ai_cost_daily_sealed WHERE day < {{before:Date}} "
            "GROUP BY client_id, day, operation_type, model) AS se "
            "ON st.client_id = se.client_id AND st.day = se.day "
            "AND st.operation_type = se.operation_type AND st.model = se.model "
            "WHERE st.rows != se.sealed"
        )
        result = self.client.query(sql, parameters={"before": before.isoformat()})
        return {(c, d, t, m): int(n) for c, d, t, m, n in result.result_rows}

    def seal(self) -> int:
        """Seal what can be sealed now; return how many buckets were sealed."""
        before = self.today()
        first = self._rows(before)
        if not first:
            return 0
        days = sorted({k[1].isoformat() for k in first})
        clients = sorted({k[0] for k in first})
        exact = self.client.query(
            "SELECT client_id, toDate(requested_at) AS day, operation_type, model, count(), "
            "countIf(success), sum(toDecimal128(cost_usd, 9)), sum(duration_ms) "
            f"FROM {self.db}.ai_cost_tracking FINAL "
            "WHERE client_id IN {clients:Array(String)} AND day IN {days:Array(Date)} "
            "GROUP BY client_id, day, operation_type, model",
            parameters={"clients": clients, "days": days},
        ).result_rows
        again = self._rows(before)
        now = to_millis(datetime.now(UTC))
        rows = []
        for c, d, t, m, ops, ok, cost, duration in exact:
            key = (c, d, t, m)
            if key in first and again.get(key) == first[key]:
                rows.append([d, c, t, m, int(ops), int(ok), Decimal(cost), int(duration),
                             first[key], now])
        for chunk in by_months(rows, MONTHS_PER_INSERT):
            self.client.insert(
                "ai_cost_daily_sealed", chunk,
                column_names=["day", "client_id", "operation_type", "model", "operations",
                              "successes", "cost_usd", "duration_ms", "rows_at_seal",
                              "sealed_at"],
                database=self.db.strip("`"),
            )
        if rows:
            log.info("rollups_sealed", buckets=len(rows), before=before.isoformat())
        return len(rows)

    def run(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                with HEALTH.working("rollup-sealer"):  # idle between rounds
                    self.seal()
                failures = 0
            except Exception as exc:  # a failed round is retried at the next one
                failures += 1
                failure = classify(exc)
                log.warning("rollup_seal_failed", error=failure.reason, kind=failure.kind.value,
                            failures=failures, max_failures=self.max_failures)
                if failure.kind is FailureKind.FATAL:
                    raise RollupSealError(
                        f"Sealing the rollups met a fatal engine error "
                        f"({failure.reason.rstrip('.')}); the process must restart."
                    ) from exc
                if failures >= self.max_failures:
                    raise RollupSealError(
                        f"Sealing the rollups failed {failures} rounds in a row, the last "
                        f"with: {failure.reason.rstrip('.')}; the process must restart."
                    ) from exc
            stop.wait(self.interval)

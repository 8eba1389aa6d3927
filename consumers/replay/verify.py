"""``aipipe replay verify``: the rebuilt projection against the live one, and where they differ.

Both sides are read with ``FINAL`` and restricted to the rows whose Kafka coordinates lie in
the manifest's offset ranges (what the replay read), so a live sink that has moved on since
does not count as a difference. First per client and day (of ``created_at``): operations,
cost, and a digest (XOR of a hash of every column), which catches any changed value; then,
for each bucket that differs, row by row, naming the operation and the columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from aipipe.consumers.costs.rows import COLUMNS
from aipipe.consumers.costs.store import TABLE, database_name
from aipipe.consumers.replay.replay import Manifest

# every column but admitted_at: a run's key is stored as 1970-01-01 for rows older than
# migration 0016 in a database migrated then, and as the admission time in a fresh one
# (``rows.run_key``), so the same run differs there between the live and rebuilt sides
COMPARED = tuple(c for c in COLUMNS if c != "admitted_at")
_HASHED = ", ".join(COMPARED)


@dataclass(frozen=True)
class Cell:
    operations: int
    cost_usd: Decimal
    digest: int


@dataclass(frozen=True)
class Difference:
    client_id: str
    day: date
    what: str  # one sentence

    def __str__(self) -> str:
        return f"{self.client_id} {self.day.isoformat()}: {self.what}"


@dataclass
class Verdict:
    buckets: int
    live: dict[str, Any]
    rebuilt: dict[str, Any]
    differences: list[Difference] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {"matches": self.matches, "buckets": self.buckets, "live": self.live,
                "rebuilt": self.rebuilt,
                "differences": [{"client_id": d.client_id, "day": d.day.isoformat(),
                                 "difference": d.what} for d in self.differences]}


def range_condition(manifest: Manifest) -> str:
    """SQL selecting the rows the replay read (offsets are integers from the manifest)."""
    parts = [f"(kafka_partition = {int(r.partition)} AND kafka_offset >= {int(r.start)} "
             f"AND kafka_offset < {int(r.end)})" for r in manifest.ranges if r.size]
    if not parts:
        return "0"
    topic = manifest.topic.replace("\\", "\\\\").replace("'", "\\'")
    return f"kafka_topic = '{topic}' AND ({' OR '.join(parts)})"


def buckets(client: Any, database: str, manifest: Manifest) -> dict[tuple[str, date], Cell]:
    sql = (
        f"SELECT client_id, toDate(created_at) AS day, count(), sum(cost_usd), "
        f"groupBitXor(cityHash64(toString(tuple({_HASHED})))) "
        f"FROM `{database_name(database)}`.{TABLE} FINAL WHERE {range_condition(manifest)} "
        "GROUP BY client_id, day"
    )
    return {(c, d): Cell(int(n), Decimal(s), int(h))
            for c, d, n, s, h in client.query(sql).result_rows}


def rows_of(client: Any, database: str, manifest: Manifest, client_id: str,
            day: date) -> dict[str, dict[str, Any]]:
    sql = (
        f"SELECT {_HASHED} FROM `{database_name(database)}`.{TABLE} FINAL "
        f"WHERE client_id = {{client:String}} AND toDate(created_at) = {{day:Date}} "
        f"AND {range_condition(manifest)}"
    )
    result = client.query(sql, parameters={"client": client_id, "day": day.isoformat()})
    rows = [dict(zip(COMPARED, map(_same_kind, row), strict=True)) for row in result.result_rows]
    # keyed by run: an id run twice (after the dedup horizon) has a row per admission
    return {f"{r['operation_id']} (requested {r['requested_at']:%Y-%m-%dT%H:%M:%S.%fZ})": r
            for r in rows}


def _same_kind(value: Any) -> Any:
    """Times in UTC, however the client returned them (servers and chDB differ)."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def _money(value: Decimal) -> str:
    return f"${value:f}"


def diff_rows(client_id: str, day: date, live: dict[str, dict[str, Any]],
              rebuilt: dict[str, dict[str, Any]]) -> list[Difference]:
    out = []
    for op in sorted(live.keys() - rebuilt.keys()):
        out.append(Difference(client_id, day, f"operation {op} (cost "
                              f"{_money(live[op]['cost_usd'])}, offset "
                              f"{live[op]['kafka_partition']}:{live[op]['kafka_offset']}) is in "
                              "the live projection but missing from the rebuilt one"))
    for op in sorted(rebuilt.keys() - live.keys()):
        out.append(Difference(client_id, day, f"operation {op} (cost "
                              f"{_money(rebuilt[op]['cost_usd'])}) is in the rebuilt projection "
                              "but missing from the live one"))
    for op in sorted(live.keys() & rebuilt.keys()):
        changed = [f"{col} live {live[op][col]!s} rebuilt {rebuilt[op][col]!s}"
                   for col in COMPARED if live[op][col] != rebuilt[op][col]]
        if changed:
            out.append(Difference(client_id, day,
                                  f"operation {op} differs: {'; '.join(changed)}"))
    return out


def diff_buckets(live: dict[tuple[str, date], Cell],
                 rebuilt: dict[tuple[str, date], Cell]) -> list[tuple[str, date, str]]:
    """The buckets that differ, with a sentence on counts and sums."""
    out = []
    for key in sorted(live.keys() | rebuilt.keys()):
        a, b = live.get(key), rebuilt.get(key)
        if a == b:
            continue
        a = a or Cell(0, Decimal(0), 0)
        b = b or Cell(0, Decimal(0), 0)
        out.append((key[0], key[1],
                    f"live {a.operations} operations {_money(a.cost_usd)}, rebuilt "
                    f"{b.operations} operations {_money(b.cost_usd)}"))
    return out


def verify(live_client: Any, live_database: str, rebuilt_client: Any, rebuilt_database: str,
           manifest: Manifest) -> Verdict:
    live = buckets(live_client, live_database, manifest)
    rebuilt = buckets(rebuilt_client, rebuilt_database, manifest)

    def totals(cells: dict[tuple[str, date], Cell]) -> dict[str, Any]:
        return {"operations": sum(c.operations for c in cells.values()),
                "cost_usd": format(sum((c.cost_usd for c in cells.values()), Decimal(0)), "f"),
                "clients": len({k[0] for k in cells})}

    verdict = Verdict(len(live.keys() | rebuilt.keys()), totals(live), totals(rebuilt))
    for client_id, day, summary in diff_buckets(live, rebuilt):
        rows = diff_rows(client_id, day,
                         rows_of(live_client, live_database, manifest, client_id, day),
                         rows_of(rebuilt_client, rebuilt_database, manifest, client_id, day))
        verdict.differences.append(Difference(client_id, day, summary))
        verdict.differences.extend(rows)
    return verdict

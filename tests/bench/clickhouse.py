"""Cost rows/s into ClickHouse (chDB): the store's ``write`` against a raw ``client.insert``.

Both sides write the same rows in the same batches into identical tables (created by the
project's own migration), on one chDB path for the whole process (chDB allows one per
process), each round into fresh databases so that every round starts from an empty table
and no insert is skipped by the table's deduplication window. Ours is
``ClickHouseCostStore.write(rows, dedup_token)`` (rows are ``CostRow`` objects, turned into
column lists inside); the baseline inserts prebuilt row lists without a token.

The sink line runs the real ``CostSink`` over a topic holding the completed events of the
same rows: consume, decode, map to rows, insert, commit, timed from its first message
to its last commit (the consumer group join is left out).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer

from aipipe.consumers.costs.migrations import migrate
from aipipe.consumers.costs.rows import COLUMNS, CostRow
from aipipe.consumers.costs.sink import CostSink
from aipipe.consumers.costs.store import TABLE, ClickHouseCostStore
from aipipe.processes import wait_for
from aipipe.producers.producer import PRODUCER_DEFAULTS
from aipipe.schemas.events import OperationCompleted, encode
from tests.bench.report import Figure, Sample, Stopwatch, best_of, compare, rate


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _count(client: Client, database: str) -> int:
    return int(client.query(f"SELECT count() FROM `{database}`.{TABLE}").result_rows[0][0])


class InsertBench:
    def __init__(
        self, ours: Client, raw: Client, rows: list[CostRow], batch: int, run: str
    ) -> None:
        self.ours, self.raw, self.run = ours, raw, run
        self.rows = rows
        self.row_batches = _batches(rows, batch)
        self.list_batches = _batches([[getattr(r, c) for c in COLUMNS] for r in rows], batch)

    def _fresh(self, client: Client, side: str, label: str) -> str:
        database = f"bench_{self.run}_{side}_{label}"
        migrate(client, database)
        return database

    def write_ours(self, label: str, batches: Sequence[Sequence[CostRow]]) -> Sample:
        database = self._fresh(self.ours, "ours", label)
        store = ClickHouseCostStore(self.ours, database)
        with Stopwatch() as sw:
            for n, batch in enumerate(batches):
                store.write(batch, dedup_token=f"bench:{database}:{n}")
        return self._check(self.ours, database, batches, sw)

    def write_raw(self, label: str, batches: Sequence[Sequence[list[Any]]]) -> Sample:
        database = self._fresh(self.raw, "raw", label)
        columns = list(COLUMNS)
        with Stopwatch() as sw:
            for batch in batches:
                self.raw.insert(TABLE, batch, column_names=columns, database=database)
        return self._check(self.raw, database, batches, sw)

    @staticmethod
    def _check(
        client: Client, database: str, batches: Sequence[Sequence[Any]], sw: Stopwatch
    ) -> Sample:
        """Every row must be in the table: a skipped insert would fake the rate."""
        expected = sum(len(b) for b in batches)
        found = _count(client, database)
        if found != expected:
            raise RuntimeError(f"{database} holds {found:,} rows, expected {expected:,}")
        return sw.sample(expected)

    def warm_up(self) -> None:
        self.write_ours("warm", self.row_batches[:1])
        self.write_raw("warm", self.list_batches[:1])

    def measure_ours(self, r: int) -> Sample:
        return self.write_ours(f"r{r}", self.row_batches)

    def measure_raw(self, r: int) -> Sample:
        return self.write_raw(f"r{r}", self.list_batches)


def bench_store(
    ours: Client,
    raw: Client,
    rows: list[CostRow],
    batch: int,
    rounds: int,
    say: Callable[[str], None],
) -> Figure:
    bench = InsertBench(ours, raw, rows, batch, uuid.uuid4().hex[:8])
    say(f"  warm-up: one batch of {batch:,} rows each side")
    bench.warm_up()
    samples = best_of(rounds, {"ours": bench.measure_ours, "baseline": bench.measure_raw}, say,
                      "rows/s")
    return compare(
        metric="Cost rows/s, store.write",
        unit="rows/s",
        goal=0.8,
        method=f"best of {rounds}, alternating order, fresh tables each round, after a warm-up",
        ours=samples["ours"],
        baseline=samples["baseline"],
        notes={
            "rows_per_round": len(rows),
            "batch_rows": batch,
            "engine": "chDB (embedded), one path for the process",
            "ours": "ClickHouseCostStore.write(CostRow batch, dedup_token)",
            "baseline": "client.insert(table, prebuilt row lists, column_names), no token",
        },
    )


class TimedSink(CostSink):
    """The real sink, noting when its first message arrived and when it last committed."""

    first_at: tuple[float, float] | None = None  # (wall, process CPU)
    last_at: tuple[float, float] | None = None

    def add(self, message: Any) -> None:
        if self.first_at is None:
            self.first_at = (time.perf_counter(), time.process_time())
        super().add(message)

    def flush(self) -> None:
        before = self.written
        super().flush()
        if self.written != before:
            self.last_at = (time.perf_counter(), time.process_time())


def produce_completed(bootstrap: str, topic: str, events: list[OperationCompleted]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS})
    for n, event in enumerate(events):
        value, key = encode(event), event.client_id.encode()
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
        if n % 1000 == 0:
            producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("completed events left unacknowledged after 60 s")


def bench_sink(
    bootstrap: str,
    client: Client,
    topic: str,
    deadletter_topic: str,
    count: int,
    batch: int,
    baseline: Figure,
    say: Callable[[str], None],
    timeout: float = 120,
) -> Figure:
    database = f"bench_sink_{uuid.uuid4().hex[:8]}"
    migrate(client, database)
    sink = TimedSink(
        bootstrap=bootstrap,
        topic=topic,
        deadletter_topic=deadletter_topic,
        group_id=f"bench-sink-{uuid.uuid4().hex}",
        store=ClickHouseCostStore(client, database),
        max_rows=batch,
        max_seconds=1.0,
    )
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), name="bench-sink", daemon=True)
    thread.start()
    def all_written() -> bool:
        if not thread.is_alive():
            raise RuntimeError("the cost sink stopped before writing every row")
        return sink.written >= count

    try:
        wait_for(all_written, timeout, f"the cost sink to write {count:,} rows", interval=0.02)
    finally:
        stop.set()
        thread.join(30)
    assert sink.first_at is not None and sink.last_at is not None
    found = _count(client, database)
    if found != count:
        raise RuntimeError(f"{database} holds {found:,} rows, expected {count:,}")
    seconds = sink.last_at[0] - sink.first_at[0]
    ours = rate(count, seconds)
    ours_cpu = rate(count, sink.last_at[1] - sink.first_at[1])
    say(f"    sink wrote {count:,} rows in {seconds:.2f}s = {ours:,.0f} rows/s")
    return Figure(
        metric="Sink path rows/s, Kafka→CostSink→CH",
        unit="rows/s",
        ours=ours,
        baseline=baseline.baseline,
        goal=None,
        method="one run, first message to last commit; baseline = best raw insert above",
        rounds_ours=[round(ours, 1)],
        rounds_baseline=baseline.rounds_baseline,
        cpu_ours=ours_cpu,
        cpu_baseline=baseline.cpu_baseline,
        notes={
            "events": count,
            "batch_rows": batch,
            "ours": "CostSink: consume, decode (pydantic), row_from_completed, write, commit",
        },
    )

"""Analytics at size: rollups against the raw table, and replay against the live sink.

1. ``AIPIPE_BENCH_ROWS`` cost rows (default 10,000,000) are generated inside chDB by one
   ``INSERT … SELECT FROM numbers()``, through the real migrations, so the rollup's
   materialized view sees them as it sees the sink's inserts: 100 clients, three
   operation types and models, 90 days, 2 % failures, and a tenth of one day's operations
   (2026-10-15, about 0.1 % of all) inserted twice, as a crash re-delivers a recent stretch
   of the log; both tables are then merged (OPTIMIZE … FINAL), as background merges would,
   closed days are sealed (``aipipe.consumers.rollups.Sealer``, as the pipeline does every minute),
   and five operations of a sealed day of client-7 are re-delivered after the seal.
2. Median query time (``--rounds``, default 7) of the same question asked two ways, with
   equal answers checked: the per-client monthly summary and a budget check over a month
   through ``ai_cost_daily_client(…)``, and the all-clients monthly summary through
   ``ai_cost_daily_between(…)``, each against ``ai_cost_tracking FINAL`` filtered the same
   way; client-8 has no re-delivery, client-7 one after its day was sealed.
3. Replay rows/s (``Replayer`` into a fresh database) against the live sink's rows/s
   (``CostSink``), over the same completed events on one topic.

Standalone: ``python -m tests.bench.analytics [--rows N] [--replay-events N]``; from the
main bench call ``bench_analytics(client, bootstrap, say, …)`` on its chDB client (chDB
opens one path per process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from clickhouse_connect.driver.client import Client

from aipipe.consumers.costs.migrations import migrate
from aipipe.consumers.costs.store import ClickHouseCostStore
from aipipe.consumers.replay.replay import Replayer, plan, replay_consumer
from tests.bench.report import Figure
from tests.bench.settings import bench_settings

DEFAULT_ROWS = 10_000_000
CLIENTS = 100
MONTH = ("2026-10-01", "2026-11-01")


def generate(client: Client, database: str, rows: int) -> float:
    """``rows`` cost rows (plus 0.1 % duplicates) into ``database``; the seconds it took."""
    migrate(client, database)
    select = f"""
SELECT
    concat('op-', toString(number)), concat('ev-', toString(number)),
    concat('client-', toString(number % {CLIENTS})), NULL, toString(number), NULL,
    ['image_generation', 'text_generation', 'video_generation'][number % 3 + 1], 'gemini',
    ['gemini-2.5-flash-image', 'gemini-2.5-flash', 'veo-3.0-fast-generate-001'][number % 3 + 1],
    toDecimal64(0.0387 + (number % 7) / 1000, 9), '2025-10-01', 24, 1290, 1, NULL, 0, '{{}}',
    number % 50 != 0, NULL, 1500 + number % 4000,
    toDateTime64('2026-09-01 00:00:00', 3, 'UTC') + toIntervalSecond((number * 7919) % 7776000),
    toDateTime64('2026-09-01 00:00:03', 3, 'UTC') + toIntervalSecond((number * 7919) % 7776000),
    'bench.completed', number % 4, number
FROM numbers({{n:UInt64}})
WHERE {{where:String}} = ''
   OR (intDiv((number * 7919) % 7776000, 86400) = 44 AND number % 10 = 0)"""
    columns = (
        "operation_id, event_id, client_id, user_id, request_id, job_id, operation_type, "
        "provider, model, cost_usd, price_version, input_tokens, output_tokens, image_count, "
        "video_duration_seconds, poll_count, metadata, success, error_message, duration_ms, "
        "requested_at, created_at, kafka_topic, kafka_partition, kafka_offset")
    began = time.perf_counter()
    sql = f"INSERT INTO `{database}`.ai_cost_tracking ({columns}) {select}"
    client.command(sql, parameters={"n": rows, "where": ""})
    client.command(sql, parameters={"n": rows, "where": "dup"})  # the re-deliveries
    seconds = time.perf_counter() - began
    for table in ("ai_cost_tracking", "ai_cost_daily_state"):  # as background merges would
        client.command(f"OPTIMIZE TABLE `{database}`.{table} FINAL")
    return seconds


def seal(client: Client, database: str) -> tuple[float, int]:
    """What the pipeline's sealer does every minute: closed days sealed from FINAL."""
    from aipipe.consumers.rollups import Sealer

    began = time.perf_counter()
    buckets = Sealer(client, database).seal()
    return time.perf_counter() - began, buckets


def median_seconds(client: Client, sql: str, rounds: int,
                   params: dict[str, Any] | None = None) -> tuple[float, list[float], Any]:
    times, answer = [], None
    for _ in range(rounds):
        began = time.perf_counter()
        answer = client.query(sql, parameters=params).result_rows
        times.append(time.perf_counter() - began)
    return statistics.median(times), times, answer


def _normal(rows: Any) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in rows)


QUESTIONS: dict[str, tuple[str, str]] = {
    "per-client monthly summary": (
        "SELECT operation_type, model, sum(operations), sum(successes), sum(cost_usd) "
        "FROM {db}.ai_cost_daily_client(client = {client:String}, start = {start:Date}, "
        "end = {end:Date}) GROUP BY operation_type, model",
        "SELECT operation_type, model, count(), countIf(success), sum(cost_usd) "
        "FROM {db}.ai_cost_tracking FINAL WHERE client_id = {client:String} "
        "AND requested_at >= {start:Date} AND requested_at < {end:Date} "
        "GROUP BY operation_type, model",
    ),
    "budget check, one month": (
        "SELECT sum(cost_usd) FROM {db}.ai_cost_daily_client(client = {client:String}, "
        "start = {start:Date}, end = {end:Date})",
        "SELECT sum(cost_usd) FROM {db}.ai_cost_tracking FINAL WHERE client_id = "
        "{client:String} AND requested_at >= {start:Date} AND requested_at < {end:Date}",
    ),
    "all-clients monthly summary": (
        "SELECT client_id, sum(operations), sum(cost_usd) "
        "FROM {db}.ai_cost_daily_between(start = {start:Date}, end = {end:Date}) "
        "GROUP BY client_id",
        "SELECT client_id, count(), sum(cost_usd) FROM {db}.ai_cost_tracking FINAL "
        "WHERE requested_at >= {start:Date} AND requested_at < {end:Date} GROUP BY client_id",
    ),
}


def bench_queries(client: Client, database: str, rows: int, rounds: int,
                  say: Callable[[str], None]) -> list[Figure]:
    figures = []
    for (metric, (rollup, raw)), who in zip(
            [*QUESTIONS.items(), ("per-client monthly summary, re-delivered after sealing",
                                  QUESTIONS["per-client monthly summary"])],
            ["client-8", "client-8", "client-8", "client-7"], strict=True):
        params = {"client": who, "start": MONTH[0], "end": MONTH[1]}
        sql_rollup, sql_raw = (q.replace("{db}", f"`{database}`") for q in (rollup, raw))
        median_seconds(client, sql_rollup, 1, params)  # warm-up
        median_seconds(client, sql_raw, 1, params)
        ours, ours_all, a = median_seconds(client, sql_rollup, rounds, params)
        base, base_all, b = median_seconds(client, sql_raw, rounds, params)
        if _normal(a) != _normal(b):
            raise RuntimeError(f"{metric}: the rollup answered {a[:3]}, the raw table {b[:3]}")
        say(f"    {metric}: rollups {ours * 1000:,.1f} ms, raw FINAL {base * 1000:,.1f} ms")
        figures.append(Figure(
            metric=f"{metric}, {rows / 1e6:g}M rows", unit="queries/s",
            ours=1 / ours, baseline=1 / base, goal=None,
            method=f"median of {rounds} after a warm-up; rollup view vs ai_cost_tracking FINAL",
            rounds_ours=[round(t * 1000, 2) for t in ours_all],
            rounds_baseline=[round(t * 1000, 2) for t in base_all],
            notes={"unit_of_rounds": "ms", "answers_equal": True},
        ))
    return figures


def bench_replay(client: Client, bootstrap: str, events: int, batch: int,
                 say: Callable[[str], None]) -> Figure:
    from confluent_kafka.admin import AdminClient

    from aipipe.infra.topics import ensure_topics
    from tests.bench.clickhouse import bench_sink, produce_completed
    from tests.bench.workloads import completed_events

    run = uuid.uuid4().hex[:8]
    topic, deadletter = f"bench-{run}-replay-completed", f"bench-{run}-replay-deadletter"
    ensure_topics(bootstrap, [topic, deadletter], partitions=4)
    try:
        produce_completed(bootstrap, topic, completed_events(events, seed=7))
        baseline = Figure("raw", "rows/s", 0.0, 0.0, None, "")
        sink = bench_sink(bootstrap, client, topic, deadletter, events, batch, baseline, say)
        database = f"bench_replay_{run}"
        migrate(client, database)
        consumer = replay_consumer(bootstrap)
        ranges = plan(consumer, topic, None, None)
        began = time.perf_counter()
        manifest = Replayer(consumer, ClickHouseCostStore(client, database),
                            batch_rows=batch).run(topic, ranges)
        seconds = time.perf_counter() - began
        if manifest.rows != events:
            raise RuntimeError(f"replay wrote {manifest.rows:,} rows, expected {events:,}")
        replay = events / seconds
        say(f"    replay wrote {events:,} rows in {seconds:.2f}s = {replay:,.0f} rows/s")
    finally:
        AdminClient({"bootstrap.servers": bootstrap}).delete_topics([topic, deadletter])
    return Figure(
        metric="Replay rows/s vs live sink rows/s", unit="rows/s", ours=replay,
        baseline=sink.ours, goal=None,
        method="one run each over the same topic; replay: plan + read + insert + manifest",
        rounds_ours=[round(replay, 1)], rounds_baseline=sink.rounds_ours,
        notes={"events": events, "batch_rows": batch},
    )


def bench_analytics(client: Client, bootstrap: str | None, say: Callable[[str], None], *,
                    rows: int, rounds: int = 7, replay_events: int = 100_000,
                    batch: int = 10_000, ui: bool = False) -> list[Figure]:
    database = f"bench_analytics_{uuid.uuid4().hex[:8]}"
    say(f"[bold]analytics[/bold]: generating {rows:,} cost rows (+~0.1 % duplicates) in chDB")
    seconds = generate(client, database, rows)
    say(f"    generated in {seconds:.1f}s (rollups kept by the materialized view)")
    sealing, buckets = seal(client, database)
    say(f"    sealed {buckets:,} buckets of closed days in {sealing:.1f}s")
    # a crash re-delivers part of a sealed day: those buckets must go back to the raw table
    client.command(f"INSERT INTO `{database}`.ai_cost_tracking SELECT * EXCEPT ingested_at, "
                   f"now64(3) FROM `{database}`.ai_cost_tracking WHERE client_id = 'client-7' "
                   "AND toDate(requested_at) = '2026-10-20' LIMIT 5")
    figures = bench_queries(client, database, rows, rounds, say)
    if ui:  # the cost page's first render over the same rows
        from tests.bench.ui import bench_ui

        figures += bench_ui(client, database, rows, say)
    client.command(f"DROP DATABASE IF EXISTS `{database}`")
    if bootstrap is not None and replay_events:
        say(f"[bold]replay[/bold]: {replay_events:,} completed events, sink vs replay")
        figures.append(bench_replay(client, bootstrap, replay_events, batch, say))
    return figures


def main(argv: list[str] | None = None) -> int:
    import clickhouse_connect
    from rich.console import Console

    from tests.bench.__main__ import _kafka_up, _quiet_logs
    from tests.bench.report import render

    parser = argparse.ArgumentParser(prog="python -m tests.bench.analytics")
    parser.add_argument("--rows", type=int,
                        default=int(os.environ.get("AIPIPE_BENCH_ROWS", DEFAULT_ROWS)))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--replay-events", type=int, default=100_000,
                        help="0 skips the replay line (no Kafka needed)")
    parser.add_argument("--ui", action="store_true",
                        help="also the cost page's render in Chromium (tests/bench/ui.py)")
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 100))
    settings = bench_settings()
    bootstrap = settings.kafka_bootstrap if args.replay_events and _kafka_up(settings) else None
    _quiet_logs()
    directory = tempfile.mkdtemp(prefix="aipipe-bench-analytics-")
    began = time.monotonic()
    try:
        client = clickhouse_connect.get_client(dsn=f"chdb://{directory}/chdb")
        figures = bench_analytics(client, bootstrap, console.print, rows=args.rows,
                                  rounds=args.rounds, replay_events=args.replay_events,
                                  ui=args.ui)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    render(figures, console, title=f"aipipe analytics bench — {os.cpu_count()} cores, "
                                   f"{time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

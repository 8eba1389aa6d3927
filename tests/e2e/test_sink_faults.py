"""The cost sink meets what it cannot write, a store that goes away, and its own crash.

Each test runs a real ``aipipe run costs`` process on the local Kafka with the embedded
ClickHouse engine, produces ``operation.completed`` events straight to the completed topic,
and reads the outcome back through the worker's read endpoint, its log and the dead-letter
topic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from aipipe.consumers.costs.store import ClickHouseCostStore
from aipipe.infra.settings import Settings
from aipipe.infra.supervise import EXIT_THREAD_DIED
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.deadletter import read_headers
from aipipe.schemas.events import OperationCompleted, Usage, encode
from tests.support.fake_sentry import FakeSentry
from tests.support.pipeline import (
    consume,
    produce,
    produce_raw,
    rows_and_operations,
    store_of,
    wait_recorded,
)
from tests.support.rows import totals_of

pytestmark = pytest.mark.e2e


def completed(n: int, client: str, requested_at: datetime | None = None) -> OperationCompleted:
    return OperationCompleted(
        request_id=f"req-{client}-{n}",
        client_id=client,
        operation_id=f"op-{client}-{n}",
        requested_at=requested_at or datetime.now(UTC),
        operation_type="image_generation",
        provider="simulated",
        model="gemini-2.5-flash-image",
        success=True,
        usage=Usage(input_tokens=10 + n, image_count=1),
        cost_usd=Decimal("0.038700000") + Decimal(n) / 1000,
        price_version="2025-10-01",
        duration_ms=100 + n,
    )


def log_lines(worker: WorkerProcess, event: str) -> list[dict[str, Any]]:
    lines = []
    for line in worker.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event:
                lines.append(record)
    return lines


def physical_rows(store: ClickHouseCostStore) -> tuple[int, int]:
    """Rows as stored (no FINAL) and distinct operations: equal when no insert was doubled."""
    [(rows, operations)] = store.client.query(
        f"SELECT count(), uniqExact(operation_id) FROM {store.table}").result_rows
    return int(rows), int(operations)


def optimized_rows(settings: Settings) -> tuple[int, int, int]:
    """After ``OPTIMIZE TABLE ... FINAL``, in a process of its own (the worker has exited and
    released the chDB path): physical rows, distinct operations, rows read with FINAL."""
    table = f"`{settings.clickhouse_database}`.ai_cost_tracking"
    script = (
        "import clickhouse_connect, json, sys\n"
        "c = clickhouse_connect.get_client(dsn=sys.argv[1])\n"
        f"c.command('OPTIMIZE TABLE {table} FINAL')\n"
        f"[(r, o)] = c.query('SELECT count(), uniqExact(operation_id) FROM {table}').result_rows\n"
        f"[(f,)] = c.query('SELECT count() FROM {table} FINAL').result_rows\n"
        "print(json.dumps([r, o, f]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, settings.clickhouse_dsn],
                         capture_output=True, text=True, timeout=120, check=True)
    rows, operations, final = json.loads(out.stdout.strip().splitlines()[-1])
    return rows, operations, final


@pytest.fixture
def sink_settings(settings: Settings) -> Settings:
    prepared = settings.model_copy(update={"sink_batch_size": 500, "sink_batch_seconds": 1.0})
    prepare_topics(prepared)
    return prepared


@pytest.fixture
def sentry() -> Iterator[FakeSentry]:
    with FakeSentry() as server:
        yield server


def test_unwritable_messages_are_dead_lettered_and_every_valid_operation_is_costed(
    sink_settings: Settings,
) -> None:
    settings = sink_settings.model_copy(update={"rollup_seal_seconds": 1.0,
                                                "sink_batch_seconds": 2.0})
    # one batch whose rows span 106 months, one of them in another century: ClickHouse
    # refuses it whole (more than 100 partitions), though each row is fine on its own
    spread = [completed(i, f"client-{i % 3}", datetime(2017 + i // 12, i % 12 + 1, 15, tzinfo=UTC))
              for i in range(105)]
    spread.append(completed(105, "client-0", datetime(2251, 6, 15, tzinfo=UTC)))
    produce(settings, settings.topics.completed, spread)
    worker = WorkerProcess(settings, "costs").start()
    try:
        store = store_of(settings, worker)
        wait_recorded(store, len(spread), timeout=120, worker=worker)
        splits = [line for line in log_lines(worker, "sink_batch_split")
                  if line["stage"] == "costs"]
        assert splits and "Too many partitions for single INSERT block" in splits[0]["error"]

        # messages that decode to an operation.completed but cannot become a stored row
        template = orjson.loads(encode(completed(0, "client-bad")))
        deep = encode(completed(900, "client-bad")).replace(
            b'"metadata":{}', b'"metadata":' + b'{"a":' * 300 + b"1" + b"}" * 300)
        too_early = orjson.dumps({**template, "operation_id": "op-early", "event_id": "early",
                                  "requested_at": "0001-01-01T00:00:00+01:00"})
        too_many = encode(completed(901, "client-bad")).replace(
            b'"input_tokens":911', b'"input_tokens":18446744073709551616')
        assert b"18446744073709551616" in too_many and b'{"a":{"a":' in deep
        bad = [deep, too_early, too_many]
        valid = [completed(200 + i, f"client-{i % 4}") for i in range(20)]
        produce(settings, settings.topics.completed, valid[:5])
        produce_raw(settings, settings.topics.completed, [(b"client-bad", deep)])
        produce(settings, settings.topics.completed, valid[5:10])
        produce_raw(settings, settings.topics.completed, [(b"client-bad", too_early)])
        produce(settings, settings.topics.completed, valid[10:15])
        produce_raw(settings, settings.topics.completed, [(b"client-bad", too_many)])
        produce(settings, settings.topics.completed, valid[15:])

        def dead_lettered() -> int:
            return sum(line["dead_letters"] for line in log_lines(worker, "sink_batch_written")
                       if line["stage"] == "costs")

        wait_recorded(store, len(spread) + len(valid), timeout=120, worker=worker)
        wait_for(lambda: dead_lettered() >= len(bad), 60, "the dead letters")
        assert store.totals() == totals_of(spread + valid)
        assert rows_and_operations(store) == (len(spread) + len(valid),) * 2
        assert dead_lettered() == len(bad)

        dead = consume(settings, settings.topics.deadletter, expected=len(bad), timeout=60)
        assert sorted(m.value() for m in dead) == sorted(bad)
        by_value = {m.value(): read_headers(m.headers()) for m in dead}
        for message in dead:
            headers = by_value[message.value()]
            assert headers["aipipe.dlq.stage"] == "costs"
            assert headers["aipipe.dlq.topic"] == settings.topics.completed
            assert headers["aipipe.dlq.error"]
            assert headers["aipipe.dlq.reason"].endswith(".")
        assert "nest" in by_value[deep]["aipipe.dlq.reason"]
        assert any(word in by_value[too_early]["aipipe.dlq.reason"]
                   for word in ("requested_at", "date value out of range"))
        assert "input_tokens" in by_value[too_many]["aipipe.dlq.reason"]

        # the sealer seals 105 past months without tripping over the same partition limit
        wait_for(lambda: bool(log_lines(worker, "rollups_sealed")), 60, "a rollup seal")
        assert log_lines(worker, "rollup_seal_failed") == []
        assert log_lines(worker, "worker_thread_died") == [] and worker.alive()
    finally:
        worker.stop()


def test_a_store_away_for_seconds_is_retried_and_nothing_is_lost_or_doubled(
    sink_settings: Settings,
) -> None:
    away = 8.0
    settings = sink_settings.model_copy(update={
        "sink_batch_size": 10, "sink_batch_seconds": 0.2,
        "sink_retry_base_seconds": 0.25, "sink_retry_cap_seconds": 2.0,
        # shorter than the outage: a consumer that stopped polling would lose its partitions
        "worker_session_timeout_seconds": 6.0, "sink_max_poll_interval_seconds": 6.0,
    })
    events = [completed(i, f"client-{i % 5}") for i in range(60)]
    produce(settings, settings.topics.completed, events)
    worker = WorkerProcess(settings, "costs").start(fault=f"store_unavailable@2:{away:g}")
    try:
        store = store_of(settings, worker)
        wait_recorded(store, len(events), timeout=120, worker=worker)
        assert store.totals() == totals_of(events)
        assert rows_and_operations(store) == (60, 60)
        assert physical_rows(store) == (60, 60)  # the retried insert was deduplicated

        retries = [line for line in log_lines(worker, "sink_write_retry")
                   if line["stage"] == "costs"]
        assert len({line["token"] for line in retries}) == 1  # the same batch, the same token
        waits = [line["retry_in_seconds"] for line in retries]
        assert waits[:4] == [0.25, 0.5, 1.0, 2.0] and set(waits[4:]) <= {2.0}
        assert sum(waits) >= away - 2.0  # retried through the outage, not given up
        assert "Connection refused" in retries[0]["error"]
        for quiet in ("sink_commit_failed", "sink_batch_abandoned", "worker_thread_died"):
            assert log_lines(worker, quiet) == [], quiet
    finally:
        worker.stop()
    assert worker.wait_exit(30) == 0
    assert optimized_rows(settings) == (60, 60, 60)


@pytest.mark.parametrize("role", ["costs", "all"])  # "all": faust runs the main thread
def test_a_sink_thread_that_raises_takes_its_process_down_loudly(
    sink_settings: Settings, sentry: FakeSentry, role: str,
) -> None:
    settings = sink_settings.model_copy(update={"sink_batch_size": 10,
                                                "sink_batch_seconds": 0.2})
    events = [completed(i, f"client-{i % 3}") for i in range(30)]
    produce(settings, settings.topics.completed, events)
    worker = WorkerProcess(settings, role)
    worker.start(fault="sink_raise@2", sentry_dsn=sentry.dsn)
    try:
        assert worker.wait_exit(120) == EXIT_THREAD_DIED == 70, worker.log_tail()
        [died] = log_lines(worker, "worker_thread_died")
        assert died["thread"] == "cost-sink" and died["level"] == "error"
        assert died["error"] == "InjectedFault: Fault injected at sink_raise@2."
        assert "Traceback" in died["exception"]
        [exiting] = log_lines(worker, "worker_exiting")
        assert exiting["exit_code"] == 70
        wait_for(lambda: any(e.get("tags", {}).get("thread") == "cost-sink"
                             for e in sentry.received()), 30, "the death in Sentry")

        # a fresh process resumes from the committed offsets: nothing lost, nothing doubled
        worker = WorkerProcess(settings, role).start()
        store = store_of(settings, worker)
        wait_recorded(store, len(events), timeout=120, worker=worker)
        assert store.totals() == totals_of(events)
        assert rows_and_operations(store) == (30, 30)
    finally:
        worker.stop()

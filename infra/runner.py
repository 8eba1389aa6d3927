"""Run the pipeline's workers: streams (faust), the cost sink, or both in one process.

With the embedded ClickHouse (chDB) the process running the cost sink owns the database
path and serves read queries to other processes on a loopback HTTP endpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Literal

import structlog

from consumers.costs.budgets import BudgetProjector, BudgetStore
from consumers.costs.sink import CostSink
from consumers.costs.store import ClickHouseCostStore, open_clickhouse
from infra.queryserver import Limits, QueryServer
from infra.settings import Settings
from infra.topics import ensure_topics

Role = Literal["all", "streams", "costs"]
log = structlog.get_logger("aipipe.runner")


def prepare_topics(settings: Settings) -> None:
    ensure_topics(
        settings.kafka_bootstrap,
        settings.topics.all(),
        partitions=settings.partitions,
        retention_ms=settings.topic_retention_ms,
        replication_factor=settings.replication_factor,
    )


def sink_options(settings: Settings, name: str) -> dict[str, Any]:
    """What every batching sink of this pipeline shares; ``name`` makes its consumer group."""
    return {
        "bootstrap": settings.kafka_bootstrap,
        "deadletter_topic": settings.topics.deadletter,
        "group_id": f"{settings.topic_prefix}-{name}",
        "max_rows": settings.sink_batch_size,
        "max_seconds": settings.sink_batch_seconds,
        "session_timeout_ms": int(settings.worker_session_timeout_seconds * 1000),
    }


def budget_projector(settings: Settings, client: Any) -> BudgetProjector:
    """``budget.set`` events into ClickHouse, by the process that owns it (see budgets.py)."""
    return BudgetProjector(
        topic=settings.topics.budgets,
        store=BudgetStore(client, settings.clickhouse_database),
        **sink_options(settings, "budgets"),
    )


def archive_thread(settings: Settings, stop: threading.Event) -> threading.Thread:
    """Every message of every topic into ``events_archive`` (see consumers/archive)."""
    from consumers.archive import ArchiveSink, ArchiveStore

    sink = ArchiveSink(
        topics=settings.topics.all(),
        store=ArchiveStore(open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database),
                           settings.clickhouse_database),
        keep_prompts=settings.archive_prompts,
        **sink_options(settings, "archive"),
    )
    thread = threading.Thread(target=sink.run, args=(stop,), name="event-archive", daemon=True)
    thread.start()
    return thread


def sealer_thread(settings: Settings, stop: threading.Event) -> threading.Thread:
    """Seal the daily rollups of closed days (see consumers/rollups)."""
    from consumers.rollups import Sealer

    sealer = Sealer(open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database),
                    settings.clickhouse_database, settings.rollup_seal_seconds)
    thread = threading.Thread(target=sealer.run, args=(stop,), name="rollup-sealer",
                              daemon=True)
    thread.start()
    return thread


@contextmanager
def cost_sink_thread(settings: Settings) -> Iterator[CostSink]:
    """Run the cost sink (and, embedded, the read endpoint) in threads for the block."""
    client = open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database)
    sink = CostSink(
        topic=settings.topics.completed,
        store=ClickHouseCostStore(client, settings.clickhouse_database),
        fault=settings.fault,
        **sink_options(settings, "costs"),
    )
    server = None
    if settings.embedded:
        reader = open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database)
        server = QueryServer(reader, port=settings.query_port, home=settings.home,
                             limits=Limits.from_settings(settings))
        server.start()
        log.info("query_endpoint_started", url=server.url)
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), name="cost-sink", daemon=True)
    thread.start()
    projector = budget_projector(
        settings, open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database)
    )
    budgets = threading.Thread(target=projector.run, args=(stop,),
                               name="budget-projector", daemon=True)
    budgets.start()
    archive = archive_thread(settings, stop) if settings.archive_events else None
    sealer = sealer_thread(settings, stop)
    try:
        yield sink
    finally:
        stop.set()
        thread.join(timeout=30)
        budgets.join(timeout=30)
        if archive is not None:
            archive.join(timeout=30)
        sealer.join(timeout=30)
        if server is not None:
            server.stop()


def run(settings: Settings, role: Role = "all") -> None:
    prepare_topics(settings)
    if role == "costs":
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        with cost_sink_thread(settings):
            done.wait()
        return
    from faust import Worker

    from streams.app import create_app

    app = create_app(settings)
    worker = Worker(app, loglevel=settings.log_level if settings.log_level != "info" else "warning")
    # faust's progress spinner sets the root logger to DEBUG so that it turns on every
    # record: every aiokafka send then builds a debug record (~8 % of a busy worker)
    worker.spinner = None
    if role == "streams":
        worker.execute_from_commandline()
        return
    with cost_sink_thread(settings), suppress(SystemExit):
        worker.execute_from_commandline()

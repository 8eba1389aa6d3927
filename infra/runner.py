"""Run the pipeline's workers: streams (faust), the cost sink, or both in one process.

With the embedded ClickHouse (chDB) the process running the cost sink owns the database
path and serves read queries to other processes on a loopback HTTP endpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Literal

import structlog

from consumers.costs.sink import CostSink
from consumers.costs.store import ClickHouseCostStore, open_clickhouse
from infra.queryserver import QueryServer
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


@contextmanager
def cost_sink_thread(settings: Settings) -> Iterator[CostSink]:
    """Run the cost sink (and, embedded, the read endpoint) in threads for the block."""
    client = open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database)
    sink = CostSink(
        bootstrap=settings.kafka_bootstrap,
        topic=settings.topics.completed,
        deadletter_topic=settings.topics.deadletter,
        group_id=f"{settings.topic_prefix}-costs",
        store=ClickHouseCostStore(client, settings.clickhouse_database),
        max_rows=settings.sink_batch_size,
        max_seconds=settings.sink_batch_seconds,
        fault=settings.fault,
    )
    server = None
    if settings.embedded:
        reader = open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database)
        server = QueryServer(reader, port=settings.query_port, home=settings.home)
        server.start()
        log.info("query_endpoint_started", url=server.url)
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), name="cost-sink", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join(timeout=30)
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
    if role == "streams":
        worker.execute_from_commandline()
        return
    with cost_sink_thread(settings), suppress(SystemExit):
        worker.execute_from_commandline()

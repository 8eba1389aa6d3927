"""The costs role: the cost sink and the other ClickHouse sinks, and with the embedded
ClickHouse (chDB) the read endpoint, since the process running the cost sink owns the
database path and serves read queries to other processes on loopback.

The sinks, the rollup sealer and a probe of the read endpoint run as threads under one
``aipipe.infra.supervise.Supervisor``: when one dies the process stops and exits with code 70
(``EXIT_THREAD_DIED``), after a ``worker_thread_died`` log line and a Sentry event.
Loads no faust: ``aipipe run costs`` imports this and not ``aipipe.streams_worker``.
"""

from __future__ import annotations

import os
import signal
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import structlog
from clickhouse_connect.driver.client import Client

from aipipe.consumers.archive import ArchiveSink, ArchiveStore
from aipipe.consumers.costs.budgets import BudgetProjector, BudgetStore
from aipipe.consumers.costs.connect import open_clickhouse
from aipipe.consumers.costs.sink import CostSink
from aipipe.consumers.costs.store import ClickHouseCostStore
from aipipe.consumers.rollups import Sealer
from aipipe.consumers.webhooks import RetryPolicy, SlowHosts, WebhookProjection, WebhookSink
from aipipe.infra.kafka_auth import kafka_config
from aipipe.infra.logging import report_exception
from aipipe.infra.queryserver import Limits, QueryServer
from aipipe.infra.settings import Settings, reveal
from aipipe.infra.supervise import Supervisor

log = structlog.get_logger("aipipe.runner")


def store_client(settings: Settings) -> Client:
    """A client of the configured ClickHouse, its database migrated (on the cluster, if any)."""
    return open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database,
                           settings.clickhouse_cluster)


def sink_options(settings: Settings, name: str) -> dict[str, Any]:
    """What every batching sink of this pipeline shares; ``name`` makes its consumer group."""
    return {
        "bootstrap": settings.kafka_bootstrap,
        "kafka_config": kafka_config(settings),
        "deadletter_topic": settings.topics.deadletter,
        "group_id": f"{settings.topic_prefix}-{name}",
        "max_rows": settings.sink_batch_size,
        "max_seconds": settings.sink_batch_seconds,
        "session_timeout_ms": int(settings.worker_session_timeout_seconds * 1000),
        "max_poll_interval_ms": int(settings.sink_max_poll_interval_seconds * 1000),
        "retry_base_seconds": settings.sink_retry_base_seconds,
        "retry_cap_seconds": settings.sink_retry_cap_seconds,
        "report": partial(report_exception, stage=name),
    }


def budget_projector(settings: Settings, client: Any) -> BudgetProjector:
    """``budget.set`` events into ClickHouse, by the process that owns it (see budgets.py)."""
    return BudgetProjector(
        topic=settings.topics.budgets,
        store=BudgetStore(client, settings.clickhouse_database),
        **sink_options(settings, "budgets"),
    )


def archive_thread(
    settings: Settings, stop: threading.Event, supervisor: Supervisor
) -> threading.Thread:
    """Every message of every topic into ``events_archive`` (see consumers/archive)."""
    sink = ArchiveSink(
        topics=settings.topics.all(),
        store=ArchiveStore(store_client(settings),
                           settings.clickhouse_database),
        keep_prompts=settings.archive_prompts,
        **sink_options(settings, "archive"),
    )
    return supervisor.start("event-archive", sink.run, stop)


def sealer_thread(
    settings: Settings, stop: threading.Event, supervisor: Supervisor
) -> threading.Thread:
    """Seal the daily rollups of closed days (see consumers/rollups)."""
    sealer = Sealer(store_client(settings),
                    settings.clickhouse_database, settings.rollup_seal_seconds,
                    max_failures=settings.rollup_seal_max_failures)
    return supervisor.start("rollup-sealer", sealer.run, stop)


def webhook_threads(
    settings: Settings, stop: threading.Event, supervisor: Supervisor
) -> list[threading.Thread]:
    """POST completions and rejections to their callback URLs: one consumer makes each
    delivery's first try, another its retries from the retry topic (see consumers/webhooks)."""
    assert settings.webhook_secret is not None  # the settings refuse webhooks without one
    policy = RetryPolicy(
        max_attempts=settings.webhook_max_attempts,
        base_seconds=settings.webhook_retry_base_seconds,
        cap_seconds=settings.webhook_retry_cap_seconds,
        timeout_seconds=settings.webhook_timeout_seconds,
    )
    retries = settings.topics.webhook_retries
    # what one consumer learns of a slow receiver, the other knows too
    slow_hosts = SlowHosts(settings.webhook_slow_seconds)
    threads = []
    for name, topics, longest in (
        ("webhooks", [settings.topics.completed, settings.topics.rejected],
         policy.timeout_seconds),
        ("webhooks-retry", [retries], policy.cap_seconds + policy.timeout_seconds),
    ):
        projection = WebhookProjection(secret=reveal(settings.webhook_secret),
                                       allowed=settings.webhook_prefixes, policy=policy,
                                       retry_topic=retries, slow_hosts=slow_hosts)
        options = sink_options(settings, name)
        # a batch is one round of attempts, and the group keeps the consumer while it lasts
        options["max_rows"] = settings.webhook_concurrency
        options["max_poll_interval_ms"] = max(options["max_poll_interval_ms"],
                                              int(2000 * longest))
        sink = WebhookSink(topics=topics, projection=projection, name=name, **options)
        threads.append(supervisor.start(name, sink.run, stop))
    return threads


def answers_ping(url: str, timeout: float = 10.0) -> bool:
    """Whether the read endpoint at ``url`` answers ClickHouse's ``/ping``."""
    with urllib.request.urlopen(f"{url}/ping", timeout=timeout) as response:
        return bool(response.status == 200)


def process_supervisor(settings: Settings) -> Supervisor:
    """A supervisor that stops this process the way ``aipipe run`` stops on SIGTERM."""
    return Supervisor(request_stop=lambda: os.kill(os.getpid(), signal.SIGTERM),
                      grace_seconds=settings.worker_exit_grace_seconds)


@contextmanager
def cost_sink_thread(
    settings: Settings, supervisor: Supervisor | None = None
) -> Iterator[CostSink]:
    """Run the cost sink (and, embedded, the read endpoint) in threads for the block."""
    supervisor = supervisor or process_supervisor(settings)
    client = store_client(settings)
    sink = CostSink(
        topic=settings.topics.completed,
        store=ClickHouseCostStore(client, settings.clickhouse_database),
        fault=settings.fault,
        **sink_options(settings, "costs"),
    )
    server = None
    if settings.embedded:
        reader = store_client(settings)
        server = QueryServer(reader, port=settings.query_port, home=settings.home,
                             limits=Limits.from_settings(settings))
        server.start()
        log.info("query_endpoint_started", url=server.url)
    stop = threading.Event()
    threads = [supervisor.start("cost-sink", sink.run, stop)]
    projector = budget_projector(
        settings, store_client(settings)
    )
    threads.append(supervisor.start("budget-projector", projector.run, stop))
    if settings.archive_events:
        threads.append(archive_thread(settings, stop, supervisor))
    threads.append(sealer_thread(settings, stop, supervisor))
    if settings.webhook_prefixes:
        threads.extend(webhook_threads(settings, stop, supervisor))
    if server is not None:  # its serving thread is the server's own: probe it from outside
        threads.append(supervisor.watch("query-endpoint", partial(answers_ping, server.url),
                                        stop))
    try:
        yield sink
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        if server is not None:
            server.stop()

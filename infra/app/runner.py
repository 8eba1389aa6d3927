"""Run the pipeline's workers: streams (faust), the cost sink, or both in one process.

Each role loads only its own modules: ``aipipe.streams_worker`` (faust; no chDB) and
``aipipe.costs_worker`` (the ClickHouse sinks and the read endpoint; no faust), imported
when the role is chosen. Both roles create the pipeline's topics first.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from typing import Literal

import structlog

from aipipe.infra.gc_tuning import tune_gc
from aipipe.infra.kafka_auth import kafka_config
from aipipe.infra.leave import end_now
from aipipe.infra.metrics import serve_metrics
from aipipe.infra.settings import Settings
from aipipe.infra.topics import ensure_topics, replication_factor_for, set_topic_config
from aipipe.infra.tracing import configure_tracing
from aipipe.streams.dedup import changelog_config

Role = Literal["all", "streams", "costs"]
log = structlog.get_logger("aipipe.runner")


#: the streams' changelog-backed tables (streams/app.py); the dedup ones forget after the
#: horizon (streams/dedup.py)
DEDUP_TABLES = ("seen-requests", "done-operations", "started-operations")
TABLES = (*DEDUP_TABLES, "pending-videos")


def changelog_topic(settings: Settings, table: str) -> str:
    """The changelog faust keeps for the streams' table ``table`` (the group's name, then
    the table's)."""
    return f"{settings.topic_prefix}-streams-{table}-changelog"


def prepare_topics(settings: Settings) -> int:
    """Create the pipeline's topics and the streams' changelogs; return their replication
    factor (``replication_factor_for``: three on a cluster of three or more brokers)."""
    replicas = replication_factor_for(
        settings.kafka_bootstrap, settings.topics.requested, settings.replication_factor,
        client_config=kafka_config(settings))
    # the one topic outsiders write: its records' timestamps are the broker's, not the
    # producer's (which may be any time since 1970), so replay by time, retention and the
    # archive's month partitions (consumers/archive/sink.py) go by when records arrived.
    # Set when the topic is created, so that no record is ever written under the
    # producer's time; set again below for a topic an older release created
    requests_config = {"retention.ms": str(settings.topic_retention_ms),
                       "message.timestamp.type": "LogAppendTime"}
    ensure_topics(
        settings.kafka_bootstrap,
        [settings.topics.requested],
        client_config=kafka_config(settings),
        partitions=settings.partitions,
        replication_factor=replicas,
        config=requests_config,
    )
    ensure_topics(
        settings.kafka_bootstrap,
        settings.topics.created(),
        client_config=kafka_config(settings),
        partitions=settings.partitions,
        retention_ms=settings.topic_retention_ms,
        replication_factor=replicas,
    )
    # created here too, not only by faust at start: a table written before the broker's
    # metadata knows its changelog raises PartitionsMismatch, and the worker goes down
    def changelogs(*tables: str) -> list[str]:
        return [changelog_topic(settings, table) for table in tables]

    dedup_config = changelog_config(settings.dedup_horizon_hours * 3600)
    for names, config in ((changelogs("pending-videos"), {"cleanup.policy": "compact"}),
                          (changelogs(*DEDUP_TABLES), dedup_config)):
        ensure_topics(
            settings.kafka_bootstrap,
            names,
            client_config=kafka_config(settings),
            partitions=settings.partitions,
            replication_factor=replicas,
            config=config,
        )
    # a dedup changelog an older release created (compacted only), or another horizon
    set_topic_config(settings.kafka_bootstrap, changelogs(*DEDUP_TABLES), dedup_config,
                     client_config=kafka_config(settings))
    set_topic_config(settings.kafka_bootstrap, [settings.topics.requested],
                     {"message.timestamp.type": "LogAppendTime"},
                     client_config=kafka_config(settings))
    return replicas


def end_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when ``parent`` ends (``prctl``'s
    ``PR_SET_PDEATHSIG``), so that a worker started by a script killed at once (SIGKILL,
    a timeout) stops instead of running on; and stop now if it has already ended. The
    signal comes when the thread that started this process ends: start it from the main
    thread."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("parent_death_signal_unavailable", error=os.strerror(ctypes.get_errno()))
        return
    if os.getppid() != parent:  # it ended before the line above
        log.warning("worker_parent_gone", parent_pid=parent)
        os.kill(os.getpid(), signal.SIGTERM)


def run(settings: Settings, role: Role = "all") -> None:
    """Run ``role`` until SIGTERM/SIGINT; exit 70 when a supervised thread died.

    A process that owns ClickHouse ends with ``end_now(0)`` once everything is
    closed: chDB's C exit handlers can hang (or crash) an exit that is otherwise clean.
    """
    tune_gc()
    if settings.parent_pid:
        end_with_parent(settings.parent_pid)
    if settings.tracing:  # OTEL_* (README, Tracing): spans exported by a helper process
        from aipipe.span_helper import hand_off  # deferred: OpenTelemetry only when on

        configure_tracing(settings, f"aipipe-{role}", hand_off=hand_off)
    # faust's own topics (its partition assignor's) get the same replication factor
    settings = settings.model_copy(update={"replication_factor": prepare_topics(settings)})
    serve_metrics(settings)  # /metrics, /healthz, /readyz of this process, until it exits
    if role == "streams":
        from aipipe.streams_worker import run_streams  # deferred: role-only (no chDB in streams)

        run_streams(settings)
        return
    from aipipe.costs_worker import (  # deferred: role-only (no chDB in streams)
        cost_sink_thread,
        process_supervisor,
    )

    supervisor = process_supervisor(settings)
    try:
        if role == "costs":
            done = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: done.set())
            with cost_sink_thread(settings, supervisor):
                done.wait()
        else:
            from aipipe.streams_worker import run_streams  # deferred: role-only (no faust in costs)

            run_streams(settings, alongside=cost_sink_thread(settings, supervisor))
    finally:
        supervisor.exit_if_failed()
    log.info("worker_stopped", role=role)
    end_now(0)

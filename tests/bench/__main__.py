"""``python -m tests.bench`` (``make bench``): our hot paths against raw clients, one run.

Every figure is a ratio to a raw baseline measured in the same run on the same machine,
so it transfers across machines where absolute rates do not:

1. producer events/s: ``EventProducer.send`` vs raw confluent-kafka ``produce()`` of the
   same bytes with the same headers (goal 0.8x), and, for scale, vs raw ``produce()``
   without headers (``--only producer`` runs this part alone);
2. cost rows/s into ClickHouse: ``ClickHouseCostStore.write`` vs raw ``client.insert``
   (goal 0.8x);
3. (informational) the full cost sink path, Kafka -> ``CostSink`` -> ClickHouse, against
   the raw insert rate of 2.

``--only`` also picks ``admission`` (the limiter, and an ``aipipe run streams`` worker vs
a confluent-kafka loop with the same gate, under the default limit and with every
request admitted), ``admission-scaling`` (``--scaling-count`` requests decided by two
streams workers vs one, same run), ``latency``, ``analytics``, ``endpoint`` (the read
endpoint against chDB in-process: ``tests/bench/endpoint.py``), ``generation``
(completions/s and in-flight calls at 2 s provider latency, and the per-operation
overhead: ``tests/bench/generation.py``) and ``burst`` (``--burst-count`` pre-produced
requests, 100,000 by default, through the whole pipeline next to a bare faust copy
agent: ``tests/bench/burst.py``), ``observability`` (``--observability-count`` requests
end to end with traces and metrics on vs off, same run: ``tests/bench/observability.py``),
``ui`` (with ``analytics``: the cost page's first render in Chromium over the same 10M
rows: ``tests/bench/ui.py``), ``cluster`` (``--cluster-count`` requests end to end
on a three-broker local cluster vs the one broker, same run: ``tests/bench/cluster.py``).
``dedup`` (not in the default run: it takes long) is a
streams worker's memory and restart-recovery time with ``--dedup-keys`` requests' worth of
dedup keys, before and after the dedup horizon (``tests/bench/dedup_state.py``).

Each side runs best of ``--rounds`` (default 5) in rotating order after a warm-up. The
CPU ratio column compares items per process-CPU-second, which moves less than wall time
when other processes share the cores. Needs the local Kafka (``aipipe up``); ClickHouse
is chDB in a temporary directory (one path for the process), removed afterwards; topics
are unique per run and deleted afterwards. Results are printed and written to
``<AIPIPE_HOME>/bench.json``; ``--strict`` exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import clickhouse_connect
import confluent_kafka
import structlog
from confluent_kafka.admin import AdminClient
from rich.console import Console

from aipipe.consumers.costs.connect import open_clickhouse
from aipipe.infra.leave import leave
from aipipe.infra.settings import Settings
from aipipe.infra.topics import ensure_topics
from tests.bench.admission import admission_figures, scaling_figures
from tests.bench.analytics import bench_analytics
from tests.bench.burst import bench_burst
from tests.bench.clickhouse import bench_sink, bench_store, produce_completed
from tests.bench.cluster import bench_cluster
from tests.bench.dedup_state import bench_dedup_state
from tests.bench.endpoint import DEFAULT_ROWS as ENDPOINT_ROWS
from tests.bench.endpoint import bench_endpoint
from tests.bench.generation import bench_generation
from tests.bench.latency import bench_latency
from tests.bench.observability import bench_observability
from tests.bench.producer import bench_producer, profile_ours
from tests.bench.report import Figure, Steps, render, write_json
from tests.bench.settings import bench_settings
from tests.bench.workloads import completed_events, cost_rows, requested_events


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Our hot paths against raw clients, measured in one run.",
    )
    parser.add_argument("--events", type=int, default=200_000, help="producer events per round")
    parser.add_argument("--rows", type=int, default=100_000, help="ClickHouse rows per round")
    parser.add_argument("--batch", type=int, default=10_000, help="rows per insert")
    parser.add_argument("--sink-events", type=int, default=100_000, help="events through the sink")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per side (best one counts)")
    parser.add_argument("--no-sink", action="store_true", help="skip the full sink path line")
    parser.add_argument(
        "--only", nargs="+",
        default=["pipeline", "admission", "admission-scaling", "latency", "analytics", "ui",
                 "endpoint", "generation", "burst", "observability", "cluster"],
        choices=["pipeline", "producer", "admission", "admission-scaling", "latency",
                 "analytics", "ui", "endpoint", "generation", "burst", "observability",
                 "cluster", "dedup"],
        help="which parts to run (pipeline: producer, ClickHouse store and sink)",
    )
    parser.add_argument("--endpoint-rows", type=int, default=ENDPOINT_ROWS,
                        help="cost rows behind the read endpoint's summary queries")
    parser.add_argument("--generation-count", type=int, default=6000,
                        help="operations of 2 s in the generation throughput part")
    parser.add_argument("--generation-cap", type=int, default=2000,
                        help="AIPIPE_GENERATION_MAX_IN_FLIGHT for the throughput part")
    parser.add_argument("--scaling-count", type=int, default=10_000,
                        help="pre-produced requests per side in the admission-scaling part")
    parser.add_argument("--observability-count", type=int, default=10_000,
                        help="requests end to end per side in the observability part")
    parser.add_argument("--cluster-count", type=int, default=10_000,
                        help="requests end to end on 3 brokers and on 1 in the cluster part")
    parser.add_argument("--burst-count", type=int, default=100_000,
                        help="requests through the whole pipeline in the burst part")
    parser.add_argument("--dedup-keys", type=int, default=1_000_000,
                        help="requests' worth of dedup keys in the dedup part")
    parser.add_argument("--latency-count", type=int, default=1000)
    parser.add_argument("--latency-rate", type=float, default=50.0)
    parser.add_argument(
        "--analytics-rows", type=int, default=int(os.environ.get("AIPIPE_BENCH_ROWS", 10_000_000)),
        help="cost rows generated for the summary and budget queries (AIPIPE_BENCH_ROWS)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print a cProfile of our producer path"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a figure misses its goal (for CI)"
    )
    return parser.parse_args(argv)


def _quiet_logs() -> None:
    """The sink logs a line per batch; keep the bench output to its own lines."""
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _kafka_up(settings: Settings) -> bool:
    from aipipe.services import kafka_status

    return kafka_status(*settings.kafka_host_port, home=settings.home).running


def _delete_topics(bootstrap: str, names: list[str]) -> None:
    """Remove this run's topics; a failure here is not worth failing the bench for."""
    admin = AdminClient({"bootstrap.servers": bootstrap})  # alive until the futures resolve
    for future in admin.delete_topics(names).values():
        with contextlib.suppress(Exception):
            future.result(timeout=30)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    console = Console(width=max(Console().width, 100))
    settings = bench_settings()
    bootstrap = settings.kafka_bootstrap
    if not _kafka_up(settings):
        console.print(f"No Kafka answers at {bootstrap}; start it with `make up` (aipipe up).")
        return 2
    _quiet_logs()
    steps = Steps(console)
    say = steps.say
    run_id = uuid.uuid4().hex[:10]
    topics = {
        "ours": f"bench-{run_id}-producer-ours",
        "raw": f"bench-{run_id}-producer-raw",
        "headers": f"bench-{run_id}-producer-raw-headers",
        "completed": f"bench-{run_id}-completed",
        "deadletter": f"bench-{run_id}-deadletter",
    }
    ensure_topics(bootstrap, topics.values(), partitions=settings.partitions)
    chdb_dir = tempfile.mkdtemp(prefix="aipipe-bench-")
    figures: list[Figure] = []
    try:
        if "pipeline" in args.only or "producer" in args.only:
            say(f"[bold]1/3 producer[/bold]: building {args.events:,} OperationRequested events")
            events = requested_events(args.events)
            if args.profile:
                say("  profiling our path (cProfile, one pass) …")
                console.print(profile_ours(bootstrap, topics["ours"], events[: args.events // 2]))
            figures += bench_producer(bootstrap, (topics["ours"], topics["raw"], topics["headers"]),
                                      events, args.rounds, say)
            del events
        if "pipeline" in args.only:
            say(f"[bold]2/3 ClickHouse[/bold]: building {args.rows:,} cost rows; "
                f"chDB at {chdb_dir}")
            dsn = f"chdb://{chdb_dir}/chdb"
            ours_client = open_clickhouse(dsn, "bench_setup")
            raw_client = clickhouse_connect.get_client(dsn=dsn)
            rows = cost_rows(args.rows)
            store_figure = bench_store(ours_client, raw_client, rows, args.batch, args.rounds, say)
            figures.append(store_figure)
            del rows

            if not args.no_sink:
                say(f"[bold]3/3 sink[/bold]: producing {args.sink_events:,} completed events "
                    f"to {topics['completed']}")
                produce_completed(bootstrap, topics["completed"],
                                  completed_events(args.sink_events, seed=1))
                say("  running CostSink until every row is written")
                figures.append(bench_sink(bootstrap, ours_client, topics["completed"],
                                          topics["deadletter"], args.sink_events, args.batch,
                                          store_figure, say))
        if "admission" in args.only:
            figures += admission_figures(settings, say, rounds=max(args.rounds - 2, 1))
        if "admission-scaling" in args.only:
            figures += scaling_figures(settings, say, events=args.scaling_count, rounds=1)
        if "latency" in args.only:
            figures += bench_latency(settings, say, args.latency_count, args.latency_rate)
        if "analytics" in args.only or "ui" in args.only:
            figures += bench_analytics(
                open_clickhouse(f"chdb://{chdb_dir}/chdb", "bench_setup"), bootstrap, say,
                rows=args.analytics_rows, rounds=7, ui="ui" in args.only,
            )
        if "generation" in args.only:
            figures += bench_generation(settings, say, args.generation_count,
                                        args.generation_cap)
        if "burst" in args.only:
            figures += bench_burst(settings, say, args.burst_count)
        if "observability" in args.only:
            figures += bench_observability(settings, say, args.observability_count)
        if "cluster" in args.only:
            figures += bench_cluster(settings, say, args.cluster_count)
        if "dedup" in args.only:
            figures += bench_dedup_state(settings, say, args.dedup_keys)
        if "endpoint" in args.only:
            figures += bench_endpoint(open_clickhouse(f"chdb://{chdb_dir}/chdb", "bench_setup"),
                                      say, rows=args.endpoint_rows, rounds=args.rounds)
    finally:
        shutil.rmtree(chdb_dir, ignore_errors=True)
        _delete_topics(bootstrap, list(topics.values()))

    seconds = time.monotonic() - steps.started
    console.print()
    render(figures, console, title=f"aipipe bench — {os.cpu_count()} cores, {seconds:.0f}s")
    for f in figures:
        console.print(f"  [dim]{f.metric}: {f.method}[/dim]", highlight=False, soft_wrap=True)
    out = settings.home / "bench.json"
    write_json(out, figures, _meta(seconds, args))
    console.print(f"  [dim]written to {out}[/dim]", highlight=False)
    missed = [f.metric for f in figures if f.passed is False]
    if missed:
        console.print(f"  [yellow]below goal: {', '.join(missed)}[/yellow]", highlight=False)
    return 1 if missed and args.strict else 0


def _meta(seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "finished_at": datetime.now(UTC).isoformat(),
        "duration_seconds": round(seconds, 1),
        "arguments": vars(args),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "confluent_kafka": version("confluent-kafka"),
            "librdkafka": confluent_kafka.libversion()[0],
            "clickhouse_connect": version("clickhouse-connect"),
            "chdb": version("chdb"),
            "pydantic": version("pydantic"),
        },
    }


if __name__ == "__main__":
    leave(main())  # not through chDB's exit handlers, which can hang

"""End-to-end latency: request produced → cost row queryable, next to Kafka's own latency.

A real ``aipipe run all`` worker (admission, generation with the simulated provider at
zero latency, the cost sink into a fresh chDB) gets a steady load of image requests at
``rate`` per second, spread over enough clients to stay under the default rate limit.
A request's latency is the cost row's ``ingested_at`` (the ClickHouse server's clock at
the insert, the same machine) minus the wall time just before it was produced. Kafka's
own produce→consume latency is measured in the same run at the same rate: raw
confluent-kafka, the send time in the payload, read by a consumer in a thread.

The sink's batching (``AIPIPE_SINK_BATCH_SECONDS``, 1 s by default) is part of the
pipeline's latency and is reported with the figures; ``--sink-batch-seconds`` changes it.

Run alone: ``python -m tests.bench.latency``; ``bench_latency`` returns report Figures.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from aipipe.infra.settings import Settings
from aipipe.infra.topics import ensure_topics
from aipipe.processes import WorkerProcess, wait_for
from aipipe.producers import EventProducer
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationRequested
from tests.bench.report import Figure
from tests.bench.settings import bench_settings
from tests.support.pipeline import store_of

Say = Callable[[str], None]


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _paced(count: int, rate: float, send: Callable[[int], None]) -> None:
    """Call ``send(i)`` ``count`` times at ``rate`` per second, on a schedule, not in bursts."""
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # pacing the load generator, not waiting on a system
        send(i)


def kafka_latency(bootstrap: str, topic: str, count: int, rate: float) -> list[float]:
    """Raw produce → consume latencies in ms, at ``rate`` per second."""
    received: list[float] = []
    ready, done = threading.Event(), threading.Event()

    def consume() -> None:
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-reader",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False,
                             "fetch.wait.max.ms": 10})
        consumer.subscribe([topic], on_assign=lambda *_: ready.set())
        try:
            while len(received) < count and not done.is_set():
                message = consumer.poll(0.1)  # one at a time: consume() would wait for a batch
                if message is not None and message.error() is None:
                    (sent,) = struct.unpack(">d", (message.value() or b"")[:8])
                    received.append((time.time() - sent) * 1000)
        finally:
            consumer.close()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    wait_for(ready.is_set, 60, "the latency consumer's assignment", interval=0.05)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                         "enable.idempotence": True})

    def send(i: int) -> None:
        producer.produce(topic, struct.pack(">d", time.time()) + b"x" * 292, key=str(i % 64))
        producer.poll(0)

    # warm-up: a new idempotent producer's first sends wait for its producer id and the
    # topic's metadata, and the consumer's first fetch for its offsets (hundreds of ms,
    # once): measured, that start-up was the whole p99 at 200/s
    for i in range(64):
        send(i)
    producer.flush(30)
    wait_for(lambda: len(received) >= 64, 60, "the warm-up messages", interval=0.05)
    received.clear()
    _paced(count, rate, send)
    producer.flush(30)
    wait_for(lambda: len(received) >= count, 60, "every raw message consumed", interval=0.05)
    done.set()
    thread.join(10)
    return received


def pipeline_latency(
    base: Settings, count: int, rate: float, sink_batch_seconds: float, say: Say
) -> dict[str, list[float]]:
    """Request produced → cost row ingested, in ms, through a real worker, and its two parts:
    ``streams`` (→ the completed event's time) and ``sink`` (completed event → row)."""
    name = f"benchlat{uuid.uuid4().hex[:8]}"
    home = tempfile.mkdtemp(prefix="aipipe-latency-")
    settings = base.model_copy(update={
        "home": Path(home), "topic_prefix": name, "clickhouse_database": name,
        "clickhouse_url": "", "query_port": 0, "sink_batch_seconds": sink_batch_seconds,
        "simulated_latency_ms": 0, "simulated_enabled": True, "env": "production",
    })
    clients = max(50, int(rate * 2))  # at most 0.5 requests/s per client: under 60/60s
    prepare_topics(settings)
    worker = WorkerProcess(settings, "all").start()
    try:
        store = store_of(settings, worker)

        def request(i: int, tag: str) -> OperationRequested:
            return OperationRequested(
                request_id=f"{tag}-{i}", client_id=f"client-{i % clients:04d}",
                operation_type="image_generation", model="gemini-2.5-flash-image",
                params={"prompt": "a watercolour lighthouse at dawn, gulls, soft light"},
            )

        def recorded(prefix: str) -> dict[str, tuple[float, float]]:
            """request_id → (row ingested, completed event created), epoch ms."""
            result = store.client.query(
                "SELECT request_id, toUnixTimestamp64Milli(ingested_at),"
                f" toUnixTimestamp64Milli(created_at) FROM {name}.ai_cost_tracking FINAL"
                " WHERE startsWith(request_id, %(p)s)",
                parameters={"p": prefix},
            )
            return {r: (float(i), float(c)) for r, i, c in result.result_rows}


        say("  warming up the worker (assignment, first batches) and the producer")
        with EventProducer(settings.kafka_bootstrap) as producer:  # one producer: a new
            # one's first sends wait for its producer id and metadata
            producer.send_many(settings.topics.requested, [request(i, "warm") for i in range(20)])
            wait_for(lambda: len(recorded("warm-")) >= 20, 180, "the warm-up rows", interval=0.2)

            say(f"  {count:,} requests at {rate:g}/s over {clients} clients")
            sent: dict[str, float] = {}
            events = [request(i, "run") for i in range(count)]

            def send(i: int) -> None:
                sent[events[i].request_id] = time.time() * 1000
                producer.send(settings.topics.requested, events[i])

            _paced(count, rate, send)
        wait_for(lambda: len(recorded("run-")) >= count, 300, "every cost row", interval=0.5)
        rows = recorded("run-")
        latencies = [rows[r][0] - sent[r] for r in sent]
        streams_ms = [rows[r][1] - sent[r] for r in sent]
        sink_ms = [rows[r][0] - rows[r][1] for r in sent]
        say(f"  of which p50: streams (request → completed event) "
            f"{percentile(streams_ms, 50):.0f} ms, sink (completed event → row) "
            f"{percentile(sink_ms, 50):.0f} ms")
    except BaseException:
        worker.stop()
        say(f"  the worker's log and data are kept in {home}")
        raise
    worker.stop()
    shutil.rmtree(home, ignore_errors=True)
    delete_topics(settings.kafka_bootstrap, name)
    return {"total": latencies, "streams": streams_ms, "sink": sink_ms}


def delete_topics(bootstrap: str, prefix: str) -> None:
    """Remove this run's topics (faust's changelogs included); failures do not matter."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    for future in admin.delete_topics(names).values() if names else []:
        with contextlib.suppress(Exception):
            future.result(timeout=30)


def bench_latency(
    settings: Settings, say: Say, count: int = 1000, rate: float = 50.0,
    sink_batch_seconds: float | None = None,
) -> list[Figure]:
    batch = settings.sink_batch_seconds if sink_batch_seconds is None else sink_batch_seconds
    topic = f"bench-{uuid.uuid4().hex[:10]}-latency-raw"
    ensure_topics(settings.kafka_bootstrap, [topic], partitions=settings.partitions)
    say(f"[bold]latency[/bold]: raw Kafka produce→consume, {count:,} messages at {rate:g}/s")
    raw = kafka_latency(settings.kafka_bootstrap, topic, count, rate)
    delete_topics(settings.kafka_bootstrap, topic)
    say("[bold]latency[/bold]: the pipeline, request produced → cost row queryable")
    parts = pipeline_latency(settings, count, rate, batch, say)
    ours = parts["total"]
    notes: dict[str, Any] = {
        "count": count, "rate_per_second": rate, "sink_batch_seconds": batch,
        "pipeline_ms": {p: round(percentile(ours, p), 1) for p in (50, 90, 99)},
        "kafka_ms": {p: round(percentile(raw, p), 1) for p in (50, 90, 99)},
        "pipeline_mean_ms": round(statistics.fmean(ours), 1),
        "streams_ms": {p: round(percentile(parts["streams"], p), 1) for p in (50, 99)},
        "sink_ms": {p: round(percentile(parts["sink"], p), 1) for p in (50, 99)},
    }
    method = (f"{count} image requests at {rate:g}/s through `aipipe run all` (simulated "
              f"provider, sink batch {batch:g} s): cost row ingested_at - produce time; "
              "baseline: raw confluent-kafka produce→consume at the same rate")
    return [
        Figure(f"latency p{p} request→cost row", "ms", percentile(ours, p),
               percentile(raw, p), None, method, notes=notes)
        for p in (50, 99)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.latency")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--sink-batch-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    figures = bench_latency(bench_settings(), print, args.count, args.rate,
                            args.sink_batch_seconds)
    for f in figures:
        print(f"{f.metric}: pipeline {f.ours:.1f} ms, kafka {f.baseline:.1f} ms "
              f"({f.ratio:.1f}x)")
    print(figures[0].notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

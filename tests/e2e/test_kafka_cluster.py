"""The pipeline on a three-node Kafka cluster loses nothing when brokers die under load.

The module starts its own three-node KRaft cluster (``aipipe.services.start_kafka_cluster``)
on free loopback ports with its own data dirs; the shared broker is not touched. Topics
get three replicas and ``min.insync.replicas=2`` from the cluster's metadata. While a
steady stream of requests flows through ``aipipe run costs`` and ``aipipe run streams``,
the broker leading most partitions of the requests topic is SIGKILLed, restarted once the
pipeline has moved on without it, and then a second broker is SIGKILLed and restarted.
A worker that exits is restarted, as a supervisor would. In the end every request has
exactly one decision and one completion, and ClickHouse holds one cost row per
operation with per-client totals equal to the produced sum.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from aipipe import services
from aipipe.infra.settings import Settings, load_settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.producers import EventProducer
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationRequested
from tests.e2e.test_scaling import costs_settled
from tests.support.ledger import Ledger, image_requests, produce_backlog
from tests.support.ports import free_base_port

pytestmark = pytest.mark.e2e

REQUESTS, RATE, CLIENTS = 4000, 150.0, 20  # 27 s of load
WARM_UP = 20
MOVED = 200  # completions that show the pipeline goes on with a broker down
STALL_SECONDS = 120  # no completion for this long (with requests waiting): the test fails


@dataclass
class Cluster:
    nodes: list[services.KafkaNode]
    cache_dir: Path

    @property
    def bootstrap(self) -> str:
        return services.cluster_bootstrap(self.nodes)

    def node(self, node_id: int) -> services.KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def restart(self, node: services.KafkaNode, watch: Watch) -> None:
        """Start ``node`` again; the pipeline is watched while it comes up."""
        services.start_kafka_node(node, self.nodes, self.cache_dir, wait=False)
        wait_for(lambda: watch.poll() >= 0 and services.kafka_node_answers(node), 180,
                 f"node {node.node_id} to answer again")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("kafka-cluster")
    cache_dir = load_settings().cache_dir
    nodes = services.cluster_nodes("127.0.0.1", free_base_port(), 3, home)
    try:
        services.start_kafka_cluster("127.0.0.1", nodes[0].port, 3, home, cache_dir)
        yield Cluster(nodes, cache_dir)
    finally:
        services.stop_kafka_cluster(home)


@pytest.fixture
def on_cluster(settings: Settings, cluster: Cluster) -> Settings:
    return settings.model_copy(update={
        "kafka_bootstrap": cluster.bootstrap,
        "partitions": 4,
        "rate_limit": "1000000/1s",  # admit everything: every request must be completed
        "worker_session_timeout_seconds": 6.0,
        "sink_batch_size": 500,
        "sink_batch_seconds": 0.5,
        "archive_events": False,
    })


def leaders(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition -> leading node of ``topic`` now (-1: none)."""
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    return {p.id: p.leader for p in meta.topics[topic].partitions.values()}


def fully_replicated(bootstrap: str, topics: list[str]) -> bool:
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return all(len(p.isrs) == len(p.replicas) for t in topics
               for p in meta.topics[t].partitions.values())


class Load(threading.Thread):
    """Produce ``requests`` at ``rate`` per second (idempotent, acks=all) in the background."""

    error: Exception | None

    def __init__(self, settings: Settings, requests: list[OperationRequested], rate: float):
        super().__init__(name="load", daemon=True)
        self.settings, self.requests, self.rate = settings, requests, rate
        self.sent, self.error = 0, None
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        pace = threading.Event()  # never set: its wait() paces the load
        try:
            with EventProducer(self.settings.kafka_bootstrap) as producer:
                for i, request in enumerate(self.requests):
                    pace.wait(max(0.0, start + i / self.rate - time.monotonic()))
                    producer.send(self.settings.topics.requested, request)
                    self.sent = i + 1
        except Exception as exc:  # the test reports it
            self.error = exc
        finally:
            self.done.set()


@dataclass
class Watch:
    """Completions over time, and each stretch the pipeline stood still."""

    ledger: Ledger
    workers: list[WorkerProcess]
    restarts: list[str] = field(default_factory=list)
    moved_at: float = field(default_factory=time.monotonic)
    count: int = 0
    stalls: list[tuple[float, float]] = field(default_factory=list)  # (started, seconds)

    def poll(self) -> int:
        self.ledger.poll()
        now = time.monotonic()
        for worker in self.workers:  # a supervisor's job: a worker that exits is restarted
            if not worker.alive():
                code = worker.proc.returncode if worker.proc else None
                self.restarts.append(f"{worker.role} exited {code} at "
                                     f"{self.ledger.completed()} completions")
                worker.start()
        if self.ledger.completed() != self.count:
            if now - self.moved_at > 2:
                self.stalls.append((self.moved_at, round(now - self.moved_at, 1)))
            self.count, self.moved_at = self.ledger.completed(), now
        assert now - self.moved_at < STALL_SECONDS, (
            f"no completion for {now - self.moved_at:.0f} s at {self.count}; restarts: "
            f"{self.restarts}\n{self.workers[-1].log_tail()}")
        return self.count

    def until(self, goal: int, timeout: float, what: str) -> None:
        wait_for(lambda: self.poll() >= goal, timeout, what)


def test_brokers_killed_under_load_lose_nothing(
    on_cluster: Settings, cluster: Cluster
) -> None:
    settings = on_cluster
    assert prepare_topics(settings) == 3  # from the cluster's metadata: three brokers
    topic = settings.topics.requested
    requests = image_requests(REQUESTS, CLIENTS)
    home = settings.home
    costs = WorkerProcess(settings, "costs", log_path=home / "costs.log").start()
    streams = WorkerProcess(settings, "streams", log_path=home / "streams.log").start()
    ledger = Ledger(settings, in_group=False)
    watch = Watch(ledger, [costs, streams])
    load = Load(settings, requests[WARM_UP:], RATE)
    timeline: list[str] = []
    t0 = time.monotonic()

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - t0:6.1f}s {ledger.completed():5d} done, "
                        f"{load.sent:5d} sent: {what}")

    try:
        produce_backlog(settings, requests[:WARM_UP])  # the load starts once workers are up
        watch.until(WARM_UP, 180, "the warm-up's completions")
        note("workers up")
        load.start()
        wait_for(lambda: watch.poll() >= 0 and load.sent >= REQUESTS // 5, 180,
                 "a fifth of the load")
        held = leaders(settings.kafka_bootstrap, topic)
        first = cluster.node(max(set(held.values()), key=list(held.values()).count))
        note(f"SIGKILL node {first.node_id}, leader of partitions "
             f"{sorted(p for p, n in held.items() if n == first.node_id)} of {topic}")
        services.kill_kafka_node(first)
        watch.until(ledger.completed() + MOVED, 180, "completions with a broker down")
        note(f"moved on without node {first.node_id}; restarting it")
        cluster.restart(first, watch)
        note(f"node {first.node_id} answers")
        wait_for(lambda: watch.poll() >= 0 and (load.sent >= REQUESTS * 3 // 4 or fully_replicated(
            settings.kafka_bootstrap, [topic])), 180, f"node {first.node_id} back in sync")
        second = cluster.node(next(n for n in (1, 2, 3) if n != first.node_id))
        caught_up = fully_replicated(settings.kafka_bootstrap, [topic])
        note(f"SIGKILL node {second.node_id} ({'after' if caught_up else 'before'} node "
             f"{first.node_id} caught up)")
        services.kill_kafka_node(second)
        watch.until(min(REQUESTS, ledger.completed() + MOVED), 180,
                    "completions with a broker down")
        note(f"restarting node {second.node_id}")
        cluster.restart(second, watch)
        note(f"node {second.node_id} answers")
        watch.until(REQUESTS, 300, f"{REQUESTS} completions")
        note("all completed")
        load.join(30)
        assert load.error is None, load.error
        deadline = time.monotonic() + 5  # duplicates that are still on their way
        while time.monotonic() < deadline:
            ledger.poll()
        assert ledger.problems(r.event_id for r in requests) == []
        assert sum(ledger.reasons.values()) == 0
        streams.stop()
        costs_settled(settings, costs, requests=REQUESTS, clients=CLIENTS)
    finally:
        print("\n".join([*timeline, "stalls over 2 s (at s, for s): "
                         f"{[(round(at - t0, 1), d) for at, d in watch.stalls]}",
                         f"worker restarts: {watch.restarts}"]))
        ledger.close()
        for worker in (streams, costs):
            worker.stop()


def test_streams_scaled_from_one_to_three_and_back_lose_nothing(
    on_cluster: Settings, cluster: Cluster
) -> None:
    """On the same cluster: one streams worker, then three, then one again, under load."""
    settings = on_cluster
    prepare_topics(settings)
    requests = image_requests(REQUESTS, CLIENTS)
    home = settings.home
    costs = WorkerProcess(settings, "costs", log_path=home / "costs.log").start()
    streams = [WorkerProcess(settings, "streams", log_path=home / "streams-0.log").start()]
    ledger = Ledger(settings, in_group=False)
    watch = Watch(ledger, [costs, streams[0]])
    load = Load(settings, requests[WARM_UP:], RATE)
    timeline: list[str] = []
    t0 = time.monotonic()

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - t0:6.1f}s {ledger.completed():5d} done, "
                        f"{load.sent:5d} sent: {what}")

    try:
        produce_backlog(settings, requests[:WARM_UP])
        watch.until(WARM_UP, 180, "the warm-up's completions")
        load.start()
        wait_for(lambda: watch.poll() >= 0 and load.sent >= REQUESTS // 5, 180,
                 "a fifth of the load")
        note("two more streams workers")
        streams += [WorkerProcess(settings, "streams", log_path=home / f"streams-{k}.log").start()
                    for k in (1, 2)]
        watch.workers += streams[1:]
        watch.until(ledger.completed() + 2 * MOVED, 180, "completions with three workers")
        note("back to one streams worker")
        watch.workers = [costs, streams[0]]
        for worker in streams[1:]:
            worker.stop()
        watch.until(REQUESTS, 300, f"{REQUESTS} completions")
        note("all completed")
        load.join(30)
        assert load.error is None, load.error
        deadline = time.monotonic() + 5  # duplicates that are still on their way
        while time.monotonic() < deadline:
            ledger.poll()
        assert ledger.problems(r.event_id for r in requests) == []
        assert sum(ledger.reasons.values()) == 0
        streams[0].stop()
        costs_settled(settings, costs, requests=REQUESTS, clients=CLIENTS)
    finally:
        print("\n".join([*timeline, "stalls over 2 s (at s, for s): "
                         f"{[(round(at - t0, 1), d) for at, d in watch.stalls]}",
                         f"worker restarts: {watch.restarts}"]))
        ledger.close()
        for worker in [*streams, costs]:
            worker.stop()

"""Admission benchmarks: the limiter against raw Redis, admission through faust against a raw
consume→produce loop. Each pair is measured in the same run on the same machine.

1. Limiter decisions/s: ``RedisRateLimitStore.decide`` on batches of ``depth`` checks (one
   ``EVALSHA`` per batch, client and model logs, every request admitted: the most
   expensive path, two ``ZADD`` and two ``PEXPIRE`` per decision) against ``INCR``
   pipelined ``depth`` deep, both on one asyncio connection. Goal at least 0.5 times.
2. Admission events/s: an ``aipipe run streams`` worker deciding requests that were
   produced before it started, against a plain confluent-kafka loop with the same logic
   (decode, ``AdmissionGate.decide`` per batch on the same Redis, encode, produce to the
   admitted or rejected topic). Rates come from the output records' timestamps (first
   to last), so start-up is not counted. Goal at least 0.25 times. Two workloads, each
   its own figure: the default limit (most of the 20,000 requests from 50 clients are
   rejected: cheap decisions, and the worker generates little) and full admit (limit
   raised so every request is admitted: every decision writes both sliding logs, and
   the worker also runs generation for each one). The same logic on aiokafka (the
   client under faust), a faust agent that only copies records and a bare copy loop
   (no decoding, no logic) are printed and kept in the notes for scale, each under its
   own name.
3. Admission scaling: the same backlog (full admit) decided by one and by two ``aipipe
   run streams`` workers, in the same run, over at least two partitions; the backlog is
   produced at once when every worker holds partitions, so a rebalance is not measured
   (``--only admission-scaling``).

Run alone with ``python -m tests.bench.admission`` (needs ``aipipe up``), or call
``admission_figures`` from ``tests.bench.__main__``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from confluent_kafka import Consumer, ConsumerGroupState, Producer
from confluent_kafka.admin import AdminClient
from rich.console import Console

from aipipe.infra.settings import Settings
from aipipe.infra.topics import ensure_topics
from aipipe.processes import WorkerProcess, wait_for
from aipipe.producers import EventProducer
from aipipe.producers.producer import PRODUCER_DEFAULTS, headers_for
from aipipe.reader import budget_store_opener
from aipipe.schemas.events import OperationAdmitted, OperationRequested, decode, encode
from aipipe.schemas.limits import Limit
from aipipe.streams.admission.gate import build_gate
from aipipe.streams.admission.limiter import RedisRateLimitStore, redis_client
from aipipe.streams.admission.window import Check
from tests.bench.report import Figure, Sample, Steps, best_of, compare, render
from tests.bench.settings import bench_settings
from tests.bench.workloads import CLIENTS, requested_events

Say = Callable[[str], None]
UNLIMITED = Limit(1_000_000_000, 60_000)


# -- 1. limiter vs INCR ------------------------------------------------------------------


def bench_limiter(redis_url: str, decisions: int, depth: int, rounds: int, say: Say) -> Figure:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"

    async def ours(round_no: int) -> Sample:
        client = redis_client(redis_url, timeout_ms=5000)
        store = RedisRateLimitStore(client)
        checks = [Check(f"r{round_no}-{n}", f"{prefix}:c:{CLIENTS[n % len(CLIENTS)]}",
                        UNLIMITED, f"{prefix}:m:gemini-2.5-flash-image", UNLIMITED)
                  for n in range(decisions)]
        await store.decide(checks[:1])  # load the script, open the connection
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, decisions, depth):
            outcomes = await store.decide(checks[start:start + depth])
            assert outcomes[-1].admitted
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        await _drop(client, prefix)
        await client.aclose()
        return Sample(decisions / wall, decisions / cpu if cpu else 0.0)

    async def raw(round_no: int) -> Sample:
        client = redis_client(redis_url, timeout_ms=5000)
        keys = [f"{prefix}:incr:{CLIENTS[n % len(CLIENTS)]}" for n in range(decisions)]
        await client.ping()
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, decisions, depth):
            pipe = client.pipeline(transaction=False)
            for key in keys[start:start + depth]:
                pipe.incr(key)
            await pipe.execute()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        await _drop(client, prefix)
        await client.aclose()
        return Sample(decisions / wall, decisions / cpu if cpu else 0.0)

    samples = best_of(rounds, {
        "limiter": lambda r: asyncio.run(ours(r)),
        "INCR pipelined": lambda r: asyncio.run(raw(r)),
    }, say, "decisions/s")
    return compare(
        "limiter decisions/s", "/s", 0.5,
        f"RedisRateLimitStore.decide, {depth} checks per EVALSHA (client + model sliding "
        f"logs, all admitted) vs INCR pipelined {depth} deep; {decisions:,} per round, "
        "one asyncio connection",
        samples["limiter"], samples["INCR pipelined"],
        {"depth": depth, "decisions": decisions},
    )


async def _drop(client: object, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(f"{prefix}:*", count=1000)]  # type: ignore[attr-defined]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start:start + 500])  # type: ignore[attr-defined]


# -- 2. admission through faust vs a raw loop ----------------------------------------------


def simulated_requests(count: int) -> list[OperationRequested]:
    """The bench's ~300-byte requests, for the simulated provider (no network)."""
    return [e.model_copy(update={"provider": "simulated"}) for e in requested_events(count)]


def _output_rate(bootstrap: str, topics: list[str], expected: int, timeout: float) -> float:
    """Records/s between the first and the last output record's timestamps."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe(topics)
    stamps: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while len(stamps) < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=5000, timeout=0.5):
                if message.error() is None:
                    stamps.append(message.timestamp()[1])
    finally:
        consumer.close()
    if len(stamps) < expected:
        raise TimeoutError(f"only {len(stamps)} of {expected} output records within {timeout}s")
    span = (max(stamps) - min(stamps)) / 1000
    return (len(stamps) - 1) / span if span > 0 else float("inf")


def _round_settings(base: Settings, home: Path, partitions: int) -> Settings:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    settings = base.model_copy(update={"topic_prefix": prefix, "home": home / prefix,
                                       "partitions": partitions, "env": "production",
                                       "simulated_enabled": True})
    ensure_topics(settings.kafka_bootstrap, settings.topics.all(), partitions=partitions)
    return settings


def _drop_topics(settings: Settings) -> None:
    AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).delete_topics(
        list(settings.topics.all()))


def _faust_round(settings: Settings, requests: list[OperationRequested],
                 workers: int = 1) -> float:
    """``workers`` ``aipipe run streams`` processes on a backlog produced before they start."""
    with EventProducer(settings.kafka_bootstrap) as producer:
        producer.send_many(settings.topics.requested, requests)
    with _streams_workers(settings, workers):
        return _decision_rate(settings, len(requests))


@contextlib.contextmanager
def _streams_workers(settings: Settings, workers: int) -> Iterator[None]:
    """``workers`` ``aipipe run streams`` processes in the block; the topics dropped after."""
    started = [WorkerProcess(settings, "streams",
                             log_path=settings.home / f"streams-{k}.log").start()
               for k in range(workers)]
    try:
        yield
    finally:
        for worker in started:
            worker.stop()
        _drop_topics(settings)


def _decision_rate(settings: Settings, count: int) -> float:
    t = settings.topics
    return _output_rate(settings.kafka_bootstrap, [t.admitted, t.rejected], count, 300)


def _settled_round(settings: Settings, requests: list[OperationRequested],
                   workers: int) -> float:
    """``workers`` streams processes, started first; the backlog goes in once every one
    holds partitions of the requests topic (a join mid-backlog would measure faust's
    rebalance, not the workers' rate)."""
    with _streams_workers(settings, workers):
        wait_for(lambda: _group_members(settings) >= workers, 300,
                 f"{workers} streams workers holding partitions of the requests topic",
                 interval=0.5)
        with EventProducer(settings.kafka_bootstrap) as producer:
            producer.send_many(settings.topics.requested, requests)
        return _decision_rate(settings, len(requests))


def _group_members(settings: Settings) -> int:
    """Members of the streams group holding partitions of the requests topic (0 while the
    group rebalances)."""
    group = f"{settings.topic_prefix}-streams"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    except Exception:  # the group does not exist yet
        return 0
    if description.state != ConsumerGroupState.STABLE:
        return 0
    return sum(1 for m in description.members
               if any(tp.topic == settings.topics.requested
                      for tp in m.assignment.topic_partitions))


def full_admit(settings: Settings, events: int) -> Settings:
    """The settings with a default limit no client of ``events`` requests can reach."""
    return settings.model_copy(update={"rate_limit": f"{max(events, 1) * 10}/60s"})


def _raw_round(settings: Settings, requests: list[OperationRequested], logic: bool) -> float:
    """A confluent-kafka consume→produce loop: the admission logic, or a bare copy."""
    t = settings.topics
    with EventProducer(settings.kafka_bootstrap) as producer:
        producer.send_many(t.requested, requests)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"bench-{uuid.uuid4()}", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    out = Producer({"bootstrap.servers": settings.kafka_bootstrap, **PRODUCER_DEFAULTS})
    gate = build_gate(settings, budget_store_opener(settings)) if logic else None
    consumer.subscribe([t.requested])

    async def loop() -> None:
        done = 0
        while done < len(requests):
            messages = [m for m in consumer.consume(num_messages=settings.admission_batch_size,
                                                    timeout=0.05) if m.error() is None]
            done += len(messages)
            if gate is None:
                for m in messages:
                    out.produce(t.admitted, m.value(), m.key(), headers=m.headers() or [])
            else:
                batch = [decode(m.value()) for m in messages]
                result = await gate.decide([r for r in batch if isinstance(r, OperationRequested)])
                for d in result.decisions:
                    topic = t.admitted if isinstance(d, OperationAdmitted) else t.rejected
                    out.produce(topic, encode(d), d.client_id.encode(), headers=headers_for(d))
            out.poll(0)
            if messages:
                consumer.commit(asynchronous=True)
        out.flush(30)
        if gate is not None:
            await gate.limiter.close()

    try:
        asyncio.run(loop())
        return _output_rate(settings.kafka_bootstrap, [t.admitted, t.rejected], len(requests),
                            120)
    finally:
        consumer.close()
        _drop_topics(settings)


def _aiokafka_round(settings: Settings, requests: list[OperationRequested]) -> float:
    """The same logic on aiokafka (the client under faust), without faust."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    t = settings.topics
    with EventProducer(settings.kafka_bootstrap) as producer:
        producer.send_many(t.requested, requests)

    async def loop() -> None:
        gate = build_gate(settings, budget_store_opener(settings))
        consumer = AIOKafkaConsumer(
            t.requested, bootstrap_servers=settings.kafka_bootstrap,
            group_id=f"bench-{uuid.uuid4()}", auto_offset_reset="earliest",
            enable_auto_commit=False)
        out = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                               enable_idempotence=True, linger_ms=5)
        await consumer.start()
        await out.start()
        try:
            done = 0
            while done < len(requests):
                fetched = await consumer.getmany(timeout_ms=50,
                                                 max_records=settings.admission_batch_size)
                messages = [m for batch in fetched.values() for m in batch]
                done += len(messages)
                batch = [decode(m.value) for m in messages]
                result = await gate.decide([r for r in batch if isinstance(r, OperationRequested)])
                for d in result.decisions:
                    topic = t.admitted if isinstance(d, OperationAdmitted) else t.rejected
                    await out.send(topic, encode(d), key=d.client_id.encode(),
                                   headers=headers_for(d))
                if messages:
                    await consumer.commit()
            await out.flush()
        finally:
            await consumer.stop()
            await out.stop()
            await gate.limiter.close()

    try:
        asyncio.run(loop())
        return _output_rate(settings.kafka_bootstrap, [t.admitted, t.rejected], len(requests),
                            120)
    finally:
        _drop_topics(settings)


_PASSTHROUGH = """
import os, faust
from faust import Worker
e = os.environ
app = faust.App(e["BENCH_APP"], broker="kafka://" + e["BENCH_BOOTSTRAP"], store="memory://",
                web_enabled=False, producer_acks=-1, producer_linger=0.005,
                consumer_auto_offset_reset="earliest")
# BENCH_OUT: one topic, or a chain of them (IN -> OUT1 -> OUT2 ...), an agent per hop
names = [e["BENCH_IN"], *e["BENCH_OUT"].split(",")]
topics = [app.topic(n, key_type=bytes, value_type=bytes, value_serializer="raw") for n in names]

def copier(dst):
    async def copy(stream):
        async for event in stream.events():
            await dst.send(key=event.message.key, value=event.message.value)
    return copy

for hop, (src, dst) in enumerate(zip(topics, topics[1:])):
    app.agent(src, name=f"copy{hop}")(copier(dst))

worker = Worker(app, loglevel="warning")
worker.spinner = None
worker.execute_from_commandline()
"""


def _faust_passthrough_round(settings: Settings, requests: list[OperationRequested],
                             home: Path, hops: int = 1, processes: int = 1) -> float:
    """Faust agents that only copy each record to the next topic: faust's own cost.

    One hop (requested → admitted) by default; ``hops=2`` the streams' chain (requested →
    admitted → completed), its agents in one worker or (``processes=2``) one worker each.
    The rate is the last topic's."""
    import os
    import signal
    import subprocess

    t = settings.topics
    chain = [t.requested, t.admitted, t.completed][:hops + 1]
    with EventProducer(settings.kafka_bootstrap) as producer:
        producer.send_many(t.requested, requests)
    if processes == 1:
        parts = [(chain[0], chain[1:])]
    else:
        parts = [(chain[n], chain[n + 1:n + 2]) for n in range(hops)]
    procs = []
    for n, (source, outputs) in enumerate(parts):
        env = {**os.environ, "BENCH_APP": f"{settings.topic_prefix}-copy{n}",
               "BENCH_BOOTSTRAP": settings.kafka_bootstrap, "BENCH_IN": source,
               "BENCH_OUT": ",".join(outputs)}
        cwd = home / settings.topic_prefix / str(n)
        cwd.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, "-c", _PASSTHROUGH, "worker"], env=env,
                                      cwd=cwd, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
    try:
        return _output_rate(settings.kafka_bootstrap, [chain[-1]], len(requests), 300)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        _drop_topics(settings)


def bench_admission(settings: Settings, events: int, rounds: int, say: Say,
                    workload: str = "default limit") -> Figure:
    """One workload: ``settings`` carries its limit (see ``full_admit``)."""
    home = Path(tempfile.mkdtemp(prefix="aipipe-bench-admission-"))
    partitions = settings.partitions
    requests = simulated_requests(events)
    try:
        samples = best_of(rounds, {
            "faust admission": lambda r: _rate_sample(
                _faust_round(_round_settings(settings, home, partitions), requests)),
            "confluent-kafka loop": lambda r: _rate_sample(
                _raw_round(_round_settings(settings, home, partitions), requests, logic=True)),
        }, say, "events/s")
        aiokafka = _aiokafka_round(_round_settings(settings, home, partitions), requests)
        say(f"    aiokafka loop (same logic)  {aiokafka:>12,.0f} events/s")
        passthrough = _faust_passthrough_round(_round_settings(settings, home, partitions),
                                               requests, home)
        say(f"    faust copy agent            {passthrough:>12,.0f} events/s")
        bare = _raw_round(_round_settings(settings, home, partitions), requests, logic=False)
        say(f"    bare copy loop (no logic)   {bare:>12,.0f} events/s")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    best_faust = max(s.per_second for s in samples["faust admission"])
    say(f"    faust admission / aiokafka loop = {best_faust / aiokafka:.2f}x (info)")
    return compare(
        f"admission events/s, {workload}", "/s", 0.25,
        f"an `aipipe run streams` worker deciding {events:,} pre-produced requests (50 "
        f"clients, {workload}: limit {settings.rate_limit}, Redis limiter, batches of "
        f"{settings.admission_batch_size}; the worker also runs generation for what it "
        "admits) vs a confluent-kafka consume→decide→produce loop with the same gate; "
        f"{partitions} partitions; rates from output record timestamps",
        samples["faust admission"], samples["confluent-kafka loop"],
        {"events": events, "partitions": partitions, "workload": workload,
         "rate_limit": settings.rate_limit, "bare_copy_per_second": round(bare),
         "aiokafka_loop_per_second": round(aiokafka),
         "faust_passthrough_per_second": round(passthrough)},
    )


def bench_admission_scaling(settings: Settings, events: int, rounds: int, say: Say) -> Figure:
    """Full admit, one vs two ``aipipe run streams`` workers on the same backlog."""
    home = Path(tempfile.mkdtemp(prefix="aipipe-bench-scaling-"))
    partitions = max(settings.partitions, 2)
    settings = full_admit(settings, events)
    requests = simulated_requests(events)
    try:
        samples = best_of(rounds, {
            "2 workers": lambda r: _rate_sample(
                _settled_round(_round_settings(settings, home, partitions), requests, 2)),
            "1 worker": lambda r: _rate_sample(
                _settled_round(_round_settings(settings, home, partitions), requests, 1)),
        }, say, "events/s")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return compare(
        "admission events/s, 2 streams workers vs 1", "/s", None,
        f"{events:,} pre-produced requests (full admit: limit {settings.rate_limit}), "
        f"{partitions} partitions, decided by two `aipipe run streams` processes vs one, "
        "same run, rotating order; the backlog is produced once every worker holds "
        "partitions (stable group); rates from output record timestamps",
        samples["2 workers"], samples["1 worker"],
        {"events": events, "partitions": partitions},
    )


def _rate_sample(rate: float) -> Sample:
    return Sample(rate, 0.0)  # the work runs in another process: no CPU figure here


def admission_figures(settings: Settings, say: Say, *, decisions: int = 100_000,
                      depth: int = 100, events: int = 20_000, rounds: int = 3) -> list[Figure]:
    """The admission figures, for ``tests.bench.__main__``: limiter, then both workloads."""
    say(f"[bold]admission 1/3 limiter[/bold]: {decisions:,} decisions, depth {depth}")
    figures = [bench_limiter(settings.redis_dsn, decisions, depth, rounds, say)]
    say(f"[bold]admission 2/3 faust, default limit[/bold]: {events:,} requests per round")
    figures.append(bench_admission(settings, events, max(rounds - 1, 1), say))
    say(f"[bold]admission 3/3 faust, full admit[/bold]: {events:,} requests per round")
    figures.append(bench_admission(full_admit(settings, events), events, max(rounds - 1, 1),
                                   say, "full admit"))
    return figures


def scaling_figures(settings: Settings, say: Say, *, events: int = 20_000,
                    rounds: int = 2) -> list[Figure]:
    """One vs two streams workers, for ``tests.bench.__main__ --only admission-scaling``."""
    say(f"[bold]admission scaling[/bold]: {events:,} requests, 1 vs 2 streams workers")
    return [bench_admission_scaling(settings, events, rounds, say)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.admission")
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scaling", action="store_true",
                        help="only the 1 vs 2 streams workers figure")
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 100))
    steps = Steps(console)
    if args.scaling:
        figures = scaling_figures(bench_settings(), steps.say, events=args.events,
                                  rounds=max(args.rounds - 1, 1))
    else:
        figures = admission_figures(bench_settings(), steps.say, decisions=args.decisions,
                                    depth=args.depth, events=args.events, rounds=args.rounds)
    render(figures, console, title="aipipe bench — admission")
    for f in figures:
        console.print(f"  [dim]{f.metric}: {f.method}[/dim]", highlight=False, soft_wrap=True)
    return 0 if all(f.passed is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())

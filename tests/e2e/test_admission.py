"""Admission on the real Kafka and Redis, with workers as real ``aipipe run`` processes.

* Two streams workers in one consumer group over four partitions, many clients hammering
  one model with a small model limit: in every window ending at an admission, admitted ≤
  limit; every rate-limited rejection found its window full (so admissions are not below
  the limit either), and its ``retry_after_ms`` is when the oldest admission leaves. Then
  both workers are SIGKILLed mid-batch and every limiter key still has a TTL.
* Redis killed in the middle of a run: every request is decided (none lost or stuck),
  decisions switch to ``memory``, and after Redis restarts they return to ``redis``
  within the probe interval.
* Budgets: set with ``aipipe budget set``, spend read by a streams worker through the
  cost sink's read endpoint; thresholds fire once each, then ``over_budget``.

Requests are produced paced over a few seconds (load shaping, so the sliding window is
exercised over several windows); every wait for an outcome is a condition with a deadline.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from aipipe import services
from aipipe.infra.settings import Settings, home_redis_password
from aipipe.processes import WorkerProcess, wait_for
from aipipe.producers import EventProducer
from aipipe.runner import prepare_topics
from aipipe.schemas.events import (
    BudgetThresholdCrossed,
    OperationAdmitted,
    OperationRejected,
    OperationRequested,
    decode,
)
from tests.support.pipeline import operations_recorded, produce, store_of

pytestmark = pytest.mark.e2e

IMAGE = "gemini-2.5-flash-image"
Decision = OperationAdmitted | OperationRejected


class Decisions:
    """Every decision event on the admitted and rejected topics (and budget notices)."""

    def __init__(self, settings: Settings) -> None:
        t = settings.topics
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}-test-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        })
        self.consumer.subscribe([t.admitted, t.rejected, t.budgets])
        self.by_request: dict[str, Decision] = {}
        self.notices: list[BudgetThresholdCrossed] = []
        self.order: list[Decision] = []

    def poll(self) -> None:
        for message in self.consumer.consume(num_messages=1000, timeout=0.2):
            if message.error() is not None:
                continue
            event = decode(message.value())
            if isinstance(event, OperationAdmitted | OperationRejected):
                if event.operation_id not in self.by_request:
                    self.order.append(event)
                self.by_request[event.operation_id] = event
            elif isinstance(event, BudgetThresholdCrossed):
                self.notices.append(event)

    def wait(self, what: str, condition: object, timeout: float = 60,
             workers: tuple[WorkerProcess, ...] = ()) -> None:
        def check() -> bool:
            for worker in workers:
                if not worker.alive():
                    raise AssertionError(f"worker exited early:\n{worker.log_tail()}")
            self.poll()
            return bool(condition())  # type: ignore[operator]
        wait_for(check, timeout, what, interval=0.05)

    def decided(self, requests: list[OperationRequested]) -> bool:
        return all(r.event_id in self.by_request for r in requests)

    def close(self) -> None:
        self.consumer.close()


def request(client: str, seq: int, model: str = IMAGE, **params: object) -> OperationRequested:
    return OperationRequested(request_id=f"{client}-{seq}", client_id=client,
                              operation_type="image_generation" if model == IMAGE
                              else "text_generation",
                              model=model, params={"prompt": "a chair", **params})


def paced(settings: Settings, batches: list[list[OperationRequested]], every: float) -> None:
    """Produce one batch every ``every`` seconds (load shaping, not waiting)."""
    with EventProducer(settings.kafka_bootstrap) as producer:
        start = time.monotonic()
        for i, batch in enumerate(batches):
            while time.monotonic() < start + i * every:
                time.sleep(0.005)
            producer.send_many(settings.topics.requested, batch)
            producer.flush()


def group_members(settings: Settings) -> int:
    """Members of the streams group that hold partitions of the requested topic."""
    group = f"{settings.topic_prefix}-streams"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    except Exception:
        return 0
    return sum(
        1 for m in description.members
        if any(tp.topic == settings.topics.requested for tp in m.assignment.topic_partitions)
    )


@pytest.fixture
def limits_file(tmp_path: Path) -> Path:
    path = tmp_path / "limits.toml"
    path.write_text(f'[default]\nlimit = "1000/2s"\n[models."{IMAGE}"]\nlimit = "20/2s"\n')
    return path


@pytest.mark.alone  # admitted per window >= the limit: a throughput floor
def test_workers_share_the_model_limit_and_keys_always_expire(
    settings: Settings, limits_file: Path
) -> None:
    # a generous Redis timeout: this test is about the shared window, not failover, and
    # other test runs share the two cores (the default is 100 ms)
    settings = settings.model_copy(update={"partitions": 4, "rate_limits_file": limits_file,
                                           "rate_limit_redis_timeout_ms": 1000})
    prepare_topics(settings)
    workers = [WorkerProcess(settings, "streams", settings.home / f"streams-{n}.log").start()
               for n in range(2)]
    decisions = Decisions(settings)
    try:
        wait_for(lambda: group_members(settings) == 2, 120,
                 "both workers holding partitions of the requested topic")
        # 40 clients, 200 image requests/s for 6 s against 20 per 2 s; text is unlimited
        batches = [[request(f"client-{(i * 20 + k) % 40}", i * 20 + k) for k in range(20)]
                   + [request("writer", i, model="gemini-2.5-flash", max_output_tokens=10)]
                   for i in range(60)]
        paced(settings, batches, every=0.1)
        everything = [r for batch in batches for r in batch]
        decisions.wait("a decision for every request", lambda: decisions.decided(everything),
                       timeout=120, workers=tuple(workers))

        image = [d for d in decisions.by_request.values() if d.model == IMAGE]
        text = [d for d in decisions.by_request.values() if d.model != IMAGE]
        assert len(decisions.by_request) == len(everything)
        assert all(isinstance(d, OperationAdmitted) and d.backend == "redis" for d in text)
        admitted = sorted(d.decided_at for d in image  # type: ignore[misc]
                          if isinstance(d, OperationAdmitted))
        rejected = [d for d in image if isinstance(d, OperationRejected)]
        assert all(d.decided_at is not None and d.backend == "redis" for d in image)
        assert all(r.reason == "rate_limited" and r.limited_by == "model" for r in rejected)
        window = timedelta(seconds=2)

        def in_window(end: datetime) -> list[datetime]:
            return [t for t in admitted if end - window < t <= end]

        # never above the limit, in the window ending at any admission
        assert max(len(in_window(t)) for t in admitted) <= 20
        # never below it: a request was refused only when its window was full, and the
        # retry_after_ms it carries is when the oldest admission in that window leaves
        for r in rejected:
            assert r.decided_at is not None and r.retry_after_ms is not None
            held = in_window(r.decided_at)
            assert len(held) == 20, (r.decided_at, len(held))
            due = (held[0] + window - r.decided_at) / timedelta(milliseconds=1)
            assert r.retry_after_ms == pytest.approx(due, abs=1), r
            assert (r.limit, r.window_ms) == (20, 2000)
        span = (max(admitted) - min(admitted)).total_seconds()
        assert span > 4 and len(admitted) >= 20 * (span // 2), (span, len(admitted))
        assert len(admitted) <= 20 * (span // 2 + 1)

        # a final burst, and both workers SIGKILLed while deciding it
        burst = [request(f"client-{k % 40}", 10_000 + k) for k in range(400)]
        produce(settings, settings.topics.requested, burst)
        decisions.wait("the burst being decided",
                       lambda: any(r.event_id in decisions.by_request for r in burst),
                       timeout=60, workers=tuple(workers))
        for worker in workers:
            worker.kill()
        client = redis.Redis.from_url(settings.redis_dsn)
        keys = list(client.scan_iter(f"{settings.topic_prefix}:ratelimit:*"))
        # -2: expired since the scan; 0: expires within the millisecond (Redis rounds a
        # remaining time below 1 ms down to 0). -1 (no expiry) or above the window fails.
        ttls = {k: client.pttl(k) for k in keys}
        assert keys
        assert all(ttl == -2 or 0 <= ttl <= 2000 for ttl in ttls.values()), \
            {k: t for k, t in ttls.items() if not (t == -2 or 0 <= t <= 2000)}
        client.close()
    finally:
        decisions.close()
        for worker in workers:
            worker.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    home, port = tmp_path / "own-redis", _free_port()
    services.start_redis("127.0.0.1", port, home)
    yield "127.0.0.1", port, home
    services.stop_redis(home)


def test_a_redis_outage_fails_over_to_memory_and_back(
    settings: Settings, own_redis: tuple[str, int, Path]
) -> None:
    host, port, redis_home = own_redis
    probe = 1.0
    settings = settings.model_copy(update={
        "redis_url": f"redis://:{home_redis_password(redis_home, host, port)}@{host}:{port}/0",
        "rate_limit": "1000/1s",
        "rate_limit_probe_seconds": probe, "rate_limit_redis_timeout_ms": 100,
    })
    prepare_topics(settings)
    worker = WorkerProcess(settings, "streams").start()
    decisions = Decisions(settings)
    n = iter(range(1_000_000))

    def phase(seconds: float) -> list[OperationRequested]:
        batches = [[request(f"c{k}", next(n)) for k in range(5)] for _ in range(int(seconds * 10))]
        paced(settings, batches, every=0.1)
        return [r for b in batches for r in b]

    def backends(requests: list[OperationRequested]) -> list[str]:
        return [decisions.by_request[r.event_id].backend for r in requests]

    try:
        wait_for(lambda: group_members(settings) == 1, 120, "the worker holding partitions")
        before = phase(1.0)
        decisions.wait("decisions before the outage", lambda: decisions.decided(before),
                       workers=(worker,))
        assert set(backends(before)) == {"redis"}

        services.kill_redis(redis_home)
        during = phase(2.0)
        decisions.wait("decisions during the outage", lambda: decisions.decided(during),
                       workers=(worker,))
        assert "memory" in backends(during)
        assert backends(during)[-10:] == ["memory"] * 10

        services.start_redis(host, port, redis_home)
        restarted = time.time()
        after = phase(3.0)
        decisions.wait("decisions after the restart", lambda: decisions.decided(after),
                       workers=(worker,))
        assert backends(after)[-10:] == ["redis"] * 10
        first_back = min(
            d.decided_at for r in after
            if (d := decisions.by_request[r.event_id]).backend == "redis" and d.decided_at
        )
        assert first_back.timestamp() - restarted <= probe + 1.0

        everything = before + during + after
        assert all(isinstance(decisions.by_request[r.event_id], OperationAdmitted)
                   for r in everything)  # fail open, and far below the client limit
        log = worker.log_path.read_text()
        assert log.count("rate_limiter_failover") == 1
        assert log.count("rate_limiter_recovered") == 1
    finally:
        decisions.close()
        worker.stop()


def test_budgets_reject_over_budget_and_thresholds_fire_once(settings: Settings) -> None:
    # 21 images in one request: past the default AIPIPE_IMAGE_MAX_COUNT of 4
    settings = settings.model_copy(update={"budget_cache_seconds": 0.0, "image_max_count": 21})
    prepare_topics(settings)
    sink = WorkerProcess(settings, "costs").start()
    streams = WorkerProcess(settings, "streams").start()
    decisions = Decisions(settings)
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "aipipe", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    try:
        store = store_of(settings, sink)
        assert cli("budget", "set", "--client", "spender", "--amount", "1.00").returncode == 0

        def budget_recorded() -> bool:
            out = cli("budget", "check", "--client", "spender", "--json")
            return json.loads(out.stdout).get("budget_source") == "table"

        wait_for(budget_recorded, 60, "the budget in ClickHouse", interval=0.5)

        # image cost: 1290 tokens x $30/M per image + 2 prompt tokens x $0.30/M
        steps = [(21, [80]), (3, [90]), (3, [100])]  # 81 %, 93 %, 104 % of $1
        sent: list[OperationRequested] = []
        for i, (images, _) in enumerate(steps):  # each admitted, then recorded
            sent.append(request("spender", i, n=images))
            produce(settings, settings.topics.requested, sent[-1:])
            wait_for(lambda: operations_recorded(store) >= len(sent), 120,
                     f"{len(sent)} operations recorded", interval=0.2)
        late = [request("spender", 10 + k) for k in range(3)]
        produce(settings, settings.topics.requested, late)
        # the notices go out before the decisions of the request that crossed, but on a topic
        # of their own, which this consumer may fetch after the decisions' topics
        decisions.wait("the late requests decided and three budget notices read",
                       lambda: decisions.decided(late) and len(decisions.notices) >= 3,
                       workers=(sink, streams))

        assert all(isinstance(decisions.by_request[r.event_id], OperationAdmitted) for r in sent)
        for r in late:
            d = decisions.by_request[r.event_id]
            assert isinstance(d, OperationRejected) and d.reason == "over_budget", d
            assert "of its $1.00 monthly budget" in d.detail
        crossed = sorted(n.threshold_percent for n in decisions.notices)
        assert crossed == [80, 90, 100]
        hundred = next(n for n in decisions.notices if n.threshold_percent == 100)
        assert hundred.budget_usd == Decimal(1) and hundred.spend_usd > Decimal(1)

        out = cli("budget", "check", "--client", "spender", "--json")
        report = json.loads(out.stdout)
        assert out.returncode == 1 and report["over_budget"] is True
        assert report["decision"] == "reject: over_budget"
        assert report["thresholds_reached"] == [80, 90, 100]
    finally:
        decisions.close()
        streams.stop()
        sink.stop()


@pytest.mark.alone  # the new limit within reload_seconds + 2 s
def test_a_limits_file_change_applies_without_a_restart(
    settings: Settings, limits_file: Path
) -> None:
    reload_seconds = 1.0
    settings = settings.model_copy(update={"rate_limits_file": limits_file,
                                           "rate_limits_reload_seconds": reload_seconds})
    prepare_topics(settings)
    worker = WorkerProcess(settings, "streams").start()
    decisions = Decisions(settings)
    n = iter(range(1_000_000))
    try:
        wait_for(lambda: group_members(settings) == 1, 120, "the worker holding partitions")
        first = [request("acme-1", next(n), model="gemini-2.5-flash") for _ in range(3)]
        produce(settings, settings.topics.requested, first)
        decisions.wait("the first requests", lambda: decisions.decided(first), workers=(worker,))
        assert {decisions.by_request[r.event_id].limit for r in first} == {1000}

        text = limits_file.read_text() + '[clients.acme-1]\nlimit = "2/1m"\n'
        limits_file.write_text(text)
        changed = time.monotonic()
        sent: list[OperationRequested] = []

        def new_limit_applies() -> bool:
            sent.append(request("acme-1", next(n), model="gemini-2.5-flash"))
            produce(settings, settings.topics.requested, sent[-1:])
            decisions.poll()
            return any(decisions.by_request[r.event_id].limit == 2
                       for r in sent if r.event_id in decisions.by_request)

        wait_for(new_limit_applies, 30, "the new limit in decisions", interval=0.1)
        # the file is looked at every reload_seconds; a decision takes a batch interval
        assert time.monotonic() - changed <= reload_seconds + 2.0
        decisions.wait("every request decided", lambda: decisions.decided(sent),
                       workers=(worker,))
        later = [decisions.by_request[r.event_id] for r in sent]
        assert any(isinstance(d, OperationRejected) and d.limited_by == "client" for d in later)
    finally:
        decisions.close()
        worker.stop()

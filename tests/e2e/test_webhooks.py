"""Webhooks end to end: a real ``aipipe run all`` worker (simulated provider) on the local
Kafka POSTs completions and rejections to a receiver in this test, on loopback.

One worker and one receiver serve the module; every request is produced once at the start
and each test waits (with a deadline) for its own outcome. The receiver answers by path:
``/hooks/ok/…`` 200, ``/hooks/flaky/…`` 500 twice and then 200, ``/hooks/down/…`` always 500,
``/hooks/tarpit/…`` 200 once the test releases it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from aipipe.infra.settings import Settings, load_settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.producers.webhooks import WebhookVerificationError, verify_signature
from aipipe.runner import prepare_topics
from aipipe.schemas.deadletter import read_headers
from aipipe.schemas.events import OperationCompleted, OperationRejected, OperationRequested, decode
from tests.conftest import Services
from tests.support.loopback import LoopbackServer
from tests.support.pipeline import consume, produce

pytestmark = pytest.mark.e2e
SECRET = "whsec_" + "c2VjcmV0IGZvciB0aGUgd2ViaG9vayB0ZXN0cw=="
ATTEMPTS = 3


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    verdict: str  # "" when the signature held on arrival, else why not
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Receiver:
    """What the loopback receiver got, by path, and how it answered."""

    got: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)  # /hooks/tarpit/…

    def record(self, received: Received) -> int:
        with self.lock:
            self.got.append(received)
            seen = sum(1 for r in self.got if r.path == received.path)
        if received.path.startswith("/hooks/tarpit/"):
            self.release.wait(120)  # holds the connection open until the test lets it go
        if received.path.startswith("/hooks/down/"):
            return 500
        if received.path.startswith("/hooks/flaky/"):
            return 500 if seen <= 2 else 200
        return 200

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.path == path]


def handler_for(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:  # as a receiver does: on arrival, with the default replay tolerance
                verify_signature(SECRET, headers, body)
                verdict = ""
            except WebhookVerificationError as exc:
                verdict = str(exc)
            status = receiver.record(Received(self.path, headers, body, verdict))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    return Handler


@dataclass(frozen=True)
class Run:
    settings: Settings
    worker: WorkerProcess
    receiver: Receiver
    base: str
    requests: dict[str, OperationRequested]  # by name


def requested(name: str, callback_url: str, **params: Any) -> OperationRequested:
    return OperationRequested(
        request_id=f"req-{name}", client_id=f"client-{name}", provider="simulated",
        operation_type="image_generation", model="gemini-2.5-flash-image",
        params={"prompt": f"a webhook test, {name}", **params}, callback_url=callback_url,
    )


def webhook_settings(services: Services, home: Path, *bases: str, **retries: Any) -> Settings:
    """A pipeline of its own that may call each of ``bases``/hooks/, retrying as ``retries``
    say."""
    name = f"t{uuid.uuid4().hex[:10]}"
    return load_settings(
        home=home, kafka_bootstrap=services.kafka_bootstrap, redis_url=services.redis_url,
        clickhouse_url=services.clickhouse_url, clickhouse_database=name,
        topic_prefix=name, partitions=3, query_port=0, metrics_port=0, sink_batch_size=50,
        sink_batch_seconds=0.3, env="production", simulated_enabled=True,
        webhook_allowed_urls=",".join(f"{base}/hooks/" for base in bases),
        webhook_secret=SECRET, **retries)


@pytest.fixture(scope="module")
def run(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    receiver = Receiver()
    with LoopbackServer(handler_for(receiver)) as server:
        base = f"http://{server.address}"
        settings = webhook_settings(
            services, tmp_path_factory.mktemp("webhooks") / "home", base,
            webhook_max_attempts=ATTEMPTS, webhook_retry_base_seconds=0.2,
            webhook_retry_cap_seconds=0.5, webhook_timeout_seconds=5)
        requests = {
            **{f"ok-{i}": requested(f"ok-{i}", f"{base}/hooks/ok/{i}") for i in range(3)},
            "flaky": requested("flaky", f"{base}/hooks/flaky/1"),
            "down": requested("down", f"{base}/hooks/down/1"),
            "bad-params": requested("bad-params", f"{base}/hooks/ok/rejected", colour="red"),
            "off-list": requested("off-list", f"{base}/elsewhere/1"),
        }
        prepare_topics(settings)
        worker = WorkerProcess(settings, "all").start()
        try:
            produce(settings, settings.topics.requested, requests.values())
            yield Run(settings, worker, receiver, base, requests)
        finally:
            worker.stop()


def wait_deliveries(run: Run, path: str, count: int, timeout: float = 60) -> list[Received]:
    def arrived() -> bool:
        if not run.worker.alive():
            raise AssertionError(f"the worker exited:\n{run.worker.log_tail()}")
        return len(run.receiver.at(path)) >= count

    wait_for(arrived, timeout, f"{count} deliveries to {path}")
    return run.receiver.at(path)


def verified(received: Received) -> OperationCompleted | OperationRejected:
    assert received.verdict == ""
    event = decode(received.body)
    assert isinstance(event, OperationCompleted | OperationRejected)
    assert received.headers["webhook-id"] == event.event_id
    assert received.headers["content-type"] == "application/json"
    return event


def completed_on_topic(run: Run, event_id: str) -> bytes:
    """The bytes of completion ``event_id`` as the pipeline wrote them to its topic."""
    topic = run.settings.topics.completed
    completions = sum(1 for name in run.requests if name not in ("bad-params", "off-list"))
    messages = consume(run.settings, topic, expected=completions, timeout=30)
    found = [m.value() for m in messages if decode(m.value()).event_id == event_id]
    assert len(found) == 1, f"{event_id} on {topic}: {len(found)} times"
    value = found[0]
    assert value is not None
    return value


def test_each_completion_is_posted_once_with_a_valid_signature(run: Run) -> None:
    for i in range(3):
        [received] = wait_deliveries(run, f"/hooks/ok/{i}", 1)
        event = verified(received)
        assert isinstance(event, OperationCompleted) and event.success
        assert event.operation_id == run.requests[f"ok-{i}"].event_id
        assert event.callback_url == f"{run.base}/hooks/ok/{i}"
        assert received.body == completed_on_topic(run, event.event_id)


def test_a_rejection_with_an_allowed_callback_is_posted(run: Run) -> None:
    [received] = wait_deliveries(run, "/hooks/ok/rejected", 1)
    event = verified(received)
    assert isinstance(event, OperationRejected) and event.reason == "invalid"
    assert event.operation_id == run.requests["bad-params"].event_id
    assert "'params.colour' is not taken" in event.detail


def test_a_receiver_answering_500_twice_gets_the_event_on_the_third_try(run: Run) -> None:
    tries = wait_deliveries(run, "/hooks/flaky/1", 3)
    events = [verified(t) for t in tries]
    assert len({t.headers["webhook-id"] for t in tries}) == 1
    assert {t.body for t in tries} == {tries[0].body}
    assert events[0].operation_id == run.requests["flaky"].event_id
    # once the always-failing receiver has had all its tries, the flaky one has no 4th
    wait_deliveries(run, "/hooks/down/1", ATTEMPTS)
    assert len(run.receiver.at("/hooks/flaky/1")) == 3


def test_a_receiver_always_failing_ends_in_the_deadletter_topic_with_the_reason(
    run: Run
) -> None:
    tries = wait_deliveries(run, "/hooks/down/1", ATTEMPTS)
    [dead] = consume(run.settings, run.settings.topics.deadletter, expected=1, timeout=60)
    raw = dead.headers()
    assert isinstance(raw, list)
    headers = read_headers(raw)
    assert headers["aipipe.dlq.stage"] == "webhooks"
    assert headers["aipipe.dlq.topic"] == run.settings.topics.completed
    assert headers["aipipe.dlq.error"] == "WebhookDeliveryError"
    assert headers["aipipe.dlq.reason"] == (
        f"The webhook to {run.base}/hooks/down/1 failed {ATTEMPTS} times (last: HTTP 500); "
        "once the receiver answers 2xx, re-send this event from the dead-letter topic.")
    assert dead.value() == tries[0].body
    assert len(run.receiver.at("/hooks/down/1")) == ATTEMPTS


def test_a_callback_url_off_the_allowlist_is_rejected_invalid_and_never_called(
    run: Run
) -> None:
    request = run.requests["off-list"]
    rejected = [e for m in consume(run.settings, run.settings.topics.rejected, expected=2,
                                   timeout=60)
                if isinstance(e := decode(m.value()), OperationRejected)
                and e.operation_id == request.event_id]
    assert len(rejected) == 1
    [event] = rejected
    assert event.reason == "invalid" and event.callback_url is None
    assert event.detail.startswith(f"Field 'callback_url' '{run.base}/elsewhere/1' is not under "
                                   "an allowed webhook URL")
    wait_deliveries(run, "/hooks/ok/rejected", 1)  # the other rejection was delivered by now
    assert run.receiver.at("/elsewhere/1") == []


def test_a_receiver_that_keeps_failing_does_not_hold_back_the_next_deliveries(
    services: Services, tmp_path: Path,
) -> None:
    """The failing receiver's retry waits 15 s on the retry topic; a completion produced
    after its first try is delivered to another receiver in the meantime (a batch that
    waited out its retries inline held every later delivery back that long)."""
    wait = 15.0
    receiver = Receiver()
    with LoopbackServer(handler_for(receiver)) as server:
        base = f"http://{server.address}"
        settings = webhook_settings(
            services, tmp_path / "home", base, webhook_max_attempts=2,
            webhook_retry_base_seconds=wait, webhook_retry_cap_seconds=wait,
            webhook_timeout_seconds=5)
        prepare_topics(settings)
        worker = WorkerProcess(settings, "all").start()
        try:
            later = Run(settings, worker, receiver, base, {})
            produce(settings, settings.topics.requested,
                    [requested("down", f"{base}/hooks/down/1")])
            [first] = wait_deliveries(later, "/hooks/down/1", 1, timeout=120)
            produce(settings, settings.topics.requested,
                    [requested("after", f"{base}/hooks/ok/after")])
            [after] = wait_deliveries(later, "/hooks/ok/after", 1)
            tries = wait_deliveries(later, "/hooks/down/1", 2, timeout=60)
            assert first.arrived < after.arrived < tries[1].arrived
            assert tries[1].arrived - first.arrived >= wait - 0.01  # not before it was due
            [dead] = consume(settings, settings.topics.deadletter, expected=1, timeout=60)
            headers = read_headers(dead.headers())
            assert (headers["aipipe.dlq.topic"], headers["aipipe.dlq.error"]) == (
                settings.topics.completed, "WebhookDeliveryError")
            assert headers["aipipe.dlq.reason"].startswith(
                f"The webhook to {base}/hooks/down/1 failed 2 times (last: HTTP 500)")
            assert dead.value() == first.body
            assert len(receiver.at("/hooks/down/1")) == 2
        finally:
            worker.stop()


def test_a_receiver_that_never_answers_holds_no_one_elses_first_tries(
    services: Services, tmp_path: Path,
) -> None:
    """A tarpit: a receiver that takes every connection and does not answer. Its first try
    is cut at the slow time (1 s) instead of the 60 s timeout, so a completion produced
    after it reaches another receiver at once; its host is then slow, so its next request's
    first try is not made in the batch at all (the retry consumer makes it, with the whole
    timeout): the tarpit gets that event once, the first event twice (the try cut short and
    the retry)."""
    receiver = Receiver()
    with LoopbackServer(handler_for(receiver)) as good, \
            LoopbackServer(handler_for(receiver)) as slow:
        base, tar = f"http://{good.address}", f"http://{slow.address}"
        settings = webhook_settings(
            services, tmp_path / "home", base, tar, webhook_max_attempts=3,
            webhook_retry_base_seconds=0.2, webhook_retry_cap_seconds=0.5,
            webhook_timeout_seconds=60, webhook_slow_seconds=1)
        prepare_topics(settings)
        worker = WorkerProcess(settings, "all").start()
        run = Run(settings, worker, receiver, base, {})
        try:
            produce(settings, settings.topics.requested,
                    [requested("tarpit-a", f"{tar}/hooks/tarpit/a")])
            wait_deliveries(run, "/hooks/tarpit/a", 1, timeout=120)
            produce(settings, settings.topics.requested,
                    [requested("after-1", f"{base}/hooks/ok/after-1")])
            # within the 60 s timeout a batch waited on the tarpit before
            wait_deliveries(run, "/hooks/ok/after-1", 1, timeout=30)
            produce(settings, settings.topics.requested,
                    [requested("tarpit-c", f"{tar}/hooks/tarpit/c"),
                     requested("after-2", f"{base}/hooks/ok/after-2")])
            wait_deliveries(run, "/hooks/ok/after-2", 1, timeout=30)
            receiver.release.set()
            wait_deliveries(run, "/hooks/tarpit/c", 1, timeout=60)

            def passes() -> list[dict[str, Any]]:  # the worker's webhook_delivery lines
                lines = worker.log_path.read_text().splitlines()
                records = [json.loads(line) for line in lines if line.startswith("{")]
                return [r for r in records if r.get("event") == "webhook_delivery"]

            wait_for(lambda: sum(r["delivered"] for r in passes()) == 4, 60,
                     "four deliveries logged as delivered")
            [deferred] = [r for r in passes() if r.get("deferred")]
            assert (deferred["request_id"], deferred["attempts"]) == ("req-tarpit-c", 0)
            for path in ("/hooks/ok/after-1", "/hooks/ok/after-2", "/hooks/tarpit/c"):
                [received] = receiver.at(path)
                verified(received)
            tries = receiver.at("/hooks/tarpit/a")
            assert len(tries) == 2
            assert {r.headers["webhook-id"] for r in tries} == {verified(tries[0]).event_id}
        finally:
            receiver.release.set()
            worker.stop()

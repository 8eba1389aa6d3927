"""A poison corpus among valid traffic: nothing valid is lost, nothing bad stops a worker.

More than thirty hostile inputs, on every topic the pipeline consumes (requests, admitted
operations, video polls, completions, budgets): bad dates, extreme and non-finite
numbers, deep nesting, huge strings and maps, control characters, unknown fields, wrong
types, and events valid for one topic sent to another. They are produced in the middle
of a load of valid requests from other clients, with admission batching on, into one
``aipipe run`` process (admission, generation, video polls, the cost sink, the budget
projector and the archive).

For every valid request: exactly one decision, one completion, and the exact cost per
client in ClickHouse (and on disk, without ``FINAL``). For every poison input: exactly
one outcome that names the problem: a rejection ``invalid`` with a detail, a dead letter
with its reason and original coordinates, or (for a forged admitted operation, which no
client can send once the broker has ACLs) a failed completion with the reason. The
worker never exits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import Producer

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.deadletter import OFFSET, PARTITION, REASON, STAGE, TOPIC, read_headers
from aipipe.schemas.events import encode, new_event_id
from tests.e2e.test_scaling import costs_settled
from tests.support.ledger import Ledger, image_requests, read_topic

pytestmark = pytest.mark.e2e

VALID = 2000
CLIENTS = 20
NOW = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def request(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": new_event_id(), "event_type": "operation.requested", "schema_version": 1,
        "occurred_at": NOW, "request_id": "poison", "client_id": "mallory",
        "operation_type": "image_generation", "provider": "simulated",
        "model": "gemini-2.5-flash-image", "params": {"prompt": "p"},
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


def with_params(**params: Any) -> dict[str, Any]:
    return request(params={"prompt": "p", **params})


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"a": value}
    return value


def completed(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": new_event_id(), "event_type": "operation.completed", "schema_version": 1,
        "occurred_at": NOW, "request_id": "poison", "client_id": "mallory",
        "operation_id": new_event_id(), "requested_at": NOW,
        "operation_type": "image_generation", "provider": "simulated",
        "model": "gemini-2.5-flash-image", "success": True, "usage": {},
        "cost_usd": "0.01", "price_version": "2025-10-01", "duration_ms": 1,
    }
    base.update(changes)
    return base


DROP = object()


@dataclass
class Poison:
    name: str
    topic: str  # which of the pipeline's topics: requested, admitted, video_polls, ...
    value: bytes
    outcome: set[str]  # what may answer it: "rejected", "deadletter", "failed"
    operation_id: str | None = None
    headers: list[tuple[str, bytes]] | None = None


def js(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()  # orjson stops at 255 levels


def corpus() -> Iterator[Poison]:
    R, DL, REJ = "requested", {"deadletter"}, {"rejected"}
    either = {"rejected", "deadletter"}

    def req(name: str, outcome: set[str], **changes: Any) -> Poison:
        body = request(**changes)
        return Poison(name, R, js(body), outcome, body.get("event_id"))

    def par(name: str, outcome: set[str], **params: Any) -> Poison:
        body = with_params(**params)
        return Poison(name, R, js(body), outcome, body["event_id"])

    yield Poison("not json", R, b"{not json", DL)
    yield Poison("a json array", R, b"[1, 2, 3]", DL)
    yield Poison("empty value", R, b"", DL)
    yield Poison("json null", R, b"null", DL)
    yield Poison("NaN literal", R, b'{"event_type": "operation.requested", "n": NaN}', DL)
    yield req("no event_type", DL, event_type=DROP)
    yield req("unknown event_type", DL, event_type="operation.exploded")
    yield req("no event_id", DL, event_id=DROP)
    yield req("event_id of 300 characters", DL, event_id="e" * 300)
    yield req("client_id a number", DL, client_id=123)
    yield req("unknown top-level field", DL, shard=7)
    yield req("unknown operation type", DL, operation_type="audio_generation")
    yield req("occurred_at not a time", DL, occurred_at="yesterday")
    yield req("occurred_at without a zone", DL, occurred_at="2026-12-01T00:00:00")
    yield req("occurred_at in 1999 (before any price table)", either,
              occurred_at="1999-01-01T00:00:00Z")
    yield req("occurred_at in year 1", either, occurred_at="0001-01-01T00:00:00Z")
    yield req("occurred_at in year 9999", either, occurred_at="9999-12-31T23:59:59Z")
    yield req("client_id with control characters", either, client_id="mal\u0000lory\u001b[2J")
    yield req("client_id with a bidi override", DL, client_id="mallory\u202egpj.exe")
    yield Poison("not json, with 101 headers (a dead letter keeps their count)", R,
                 b"{not json", DL, headers=[(f"h{i}", b"x") for i in range(101)])
    yield req("model without a price", REJ, model="gemini-99-ultra")
    yield req("provider not offered", REJ, provider="openai-unconfigured")
    yield par("n of 1e30", either, n=1e30)
    yield par("n negative", either, n=-3)
    yield par("n a string", either, n="3")
    yield par("n fractional", either, n=1.5)
    yield par("params nested 400 deep", either, deep=nested(400))
    yield par("a map of 20,000 keys", either, **{f"k{i}": i for i in range(20_000)})
    yield par("a prompt of 200,000 characters", either, prompt="x" * 200_000)
    yield Poison("a prompt over the event size limit", R,
                 js(with_params(prompt="x" * 1_020_000)), DL)  # under the broker limit
    # near the size limit, each decided before its params are checked: a rejection that
    # carried them was over the producer's 1 MB limit, and the worker died on it
    yield req("provider not offered, params near the size limit", REJ,
              provider="openai-unconfigured", params={"prompt": "p", "pad": "x" * 990_000})
    yield req("callback not allowed, params near the size limit", REJ,
              callback_url="https://elsewhere.example/hook",
              params={"prompt": "p", "pad": "x" * 990_000})
    yield req("a model name of 510,000 characters", DL, model="m" * 510_000)
    yield par("params of 330,000 empty lists", DL, a=[[] for _ in range(330_000)])
    yield par("simulated latency of a day", either, simulate={"latency_ms": 86_400_000})
    yield par("simulated polls of a million", either, simulate={"polls": 1_000_000})
    yield Poison("a completed event on the requests topic", R, js(completed()), DL)
    yield Poison("a budget.set on the requests topic", R, js({
        "event_id": new_event_id(), "event_type": "budget.set", "occurred_at": NOW,
        "request_id": "poison", "client_id": "mallory", "amount_usd": "1000000"}), DL)
    # generation's input: a forged admitted operation must still end in one completion
    yield Poison("garbage on the admitted topic", "admitted", b"\x00\xff garbage", DL)
    yield Poison("garbage with 101 headers on the admitted topic", "admitted", b"\x00",
                 DL, headers=[(f"h{i}", b"x") for i in range(101)])
    yield Poison("a request on the admitted topic", "admitted", js(request()), DL)
    yield Poison("video polls: not json", "video_polls", b"{{{", DL)
    yield Poison("video polls: a request", "video_polls", js(request()), DL)
    # the cost sink's input
    yield Poison("completed: metadata nested 300 deep", "completed",
                 js(completed(metadata=nested(300))), DL)
    yield Poison("completed: negative cost", "completed", js(completed(cost_usd="-1")), DL)
    yield Poison("completed: cost of 1e30", "completed", js(completed(cost_usd="1e30")), DL)
    yield Poison("completed: garbage", "completed", b"\xde\xad\xbe\xef", DL)
    # the budget projector's input
    yield Poison("budgets: negative amount", "budgets", js({
        "event_id": new_event_id(), "event_type": "budget.set", "occurred_at": NOW,
        "request_id": "poison", "client_id": "mallory", "amount_usd": "-5"}), DL)
    yield Poison("budgets: a request", "budgets", js(request()), DL)


class Coordinates:
    """Produce raw messages and remember where each landed."""

    def __init__(self, settings: Settings) -> None:
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap,
                                  "enable.idempotence": True, "acks": "all",
                                  "message.max.bytes": 10_000_000})
        self.landed: dict[int, tuple[str, int, int]] = {}

    def send(self, index: int, topic: str, key: bytes, value: bytes,
             headers: list[tuple[str, bytes]] | None = None) -> None:
        def delivered(err: Any, msg: Any) -> None:
            assert err is None, err
            self.landed[index] = (msg.topic(), msg.partition(), msg.offset())

        self.producer.produce(topic, key=key, value=value, headers=headers,
                              on_delivery=delivered)
        self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(60) == 0


def dead_letters(settings: Settings) -> dict[tuple[str, int, int], dict[str, str]]:
    """Dead letters by the coordinates of the message each stands for."""
    out: dict[tuple[str, int, int], dict[str, str]] = {}
    for message in read_topic(settings, settings.topics.deadletter):
        h = read_headers(message.headers())
        out.setdefault((h[TOPIC], int(h[PARTITION]), int(h[OFFSET])), h)
    return out


def test_a_poison_corpus_among_valid_traffic_loses_and_stops_nothing(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={
        "partitions": 4, "rate_limit": "1000000/1s", "admission_batch_size": 200,
        "sink_batch_size": 500, "sink_batch_seconds": 0.3,
    })
    prepare_topics(settings)
    poisons = list(corpus())
    assert len(poisons) >= 30
    valid = image_requests(VALID, CLIENTS, prefix="valid-")
    topics = settings.topics
    out = Coordinates(settings)
    worker = WorkerProcess(settings, "all").start()
    stride = VALID // len(poisons)
    for i, event in enumerate(valid):  # poison spread through the load, batching on
        out.producer.produce(topics.requested, key=event.client_id.encode(),
                             value=encode(event))
        if i % stride == 0 and i // stride < len(poisons):
            p = poisons[i // stride]
            out.send(i // stride, getattr(topics, p.topic), b"mallory", p.value, p.headers)
        if i % 200 == 0:
            out.producer.poll(0)
    out.flush()
    ledger = Ledger(settings)
    try:
        rejected_ids: set[str] = set()

        def everything_answered() -> bool:
            ledger.poll()
            assert worker.alive(), worker.log_tail()
            return all(ledger.completed_for(e.event_id) for e in valid)

        wait_for(everything_answered, 300, "every valid request completed")
        assert ledger.problems(e.event_id for e in valid) == []
        letters = dead_letters(settings)
        unanswered = []
        for index, poison in enumerate(poisons):
            where = out.landed[index]
            answers = set()
            if where in letters:
                h = letters[where]
                assert h[REASON] and h[STAGE], h
                answers.add("deadletter")
            if poison.operation_id and poison.operation_id in ledger.decision_ids:
                decision = ledger.last_decision[poison.operation_id]
                if decision["event_type"] == "operation.rejected":
                    assert decision["reason"] == "invalid", decision
                    assert decision["detail"], decision
                    answers.add("rejected")
                    rejected_ids.add(poison.operation_id)
            if len(answers) != 1 or not answers <= poison.outcome:
                unanswered.append(f"{poison.name}: {sorted(answers) or 'no answer'}")
        assert unanswered == []
        assert rejected_ids.isdisjoint(ledger.completion_ids)  # a rejection never runs
        assert "worker_part_failed" not in worker.log_path.read_text()
    except BaseException:
        worker.kill()
        raise
    finally:
        ledger.close()
    costs_settled(settings, worker, requests=VALID, clients=CLIENTS)

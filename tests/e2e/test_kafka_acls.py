"""Kafka with SASL/SCRAM sign-in and ACLs: the broker itself refuses what a principal may
not do.

The module starts its own single-node KRaft broker (``aipipe.services.start_kafka`` with
users) on free loopback ports with its own data dir; the shared broker on 9092 is not
touched. The SCRAM users are created when the data dir is formatted, the ACLs through
the Admin API as ``admin`` (``aipipe.infra.kafka_acls.apply_acls``). Then:

- ``upstream`` produces an ``operation.requested``, and its forged ``operation.completed``
  (to the completed topic) and ``budget.set`` (to the budgets topic) fail delivery with
  TOPIC_AUTHORIZATION_FAILED; ``analysts`` can read the request but not produce one;
- ``aipipe run costs`` and ``aipipe run streams`` signed in as ``workers`` (faust's
  changelogs, its assignor's topic and the consumer groups included) turn an upstream
  request into a completion that upstream reads back through ``ResultClient``, and one
  cost row in ClickHouse.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from aipipe import services
from aipipe.infra.kafka_acls import admin_config, apply_acls, ensure_kafka_users
from aipipe.infra.kafka_auth import kafka_config
from aipipe.infra.settings import Settings, load_settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.producers import EventProducer
from aipipe.producers.producer import DeliveryError
from aipipe.producers.results import ResultClient
from aipipe.runner import prepare_topics
from aipipe.schemas.events import BudgetSet, OperationCompleted, OperationRequested, decode
from tests.support.pipeline import store_of, wait_recorded

pytestmark = pytest.mark.e2e
HOST = "127.0.0.1"
REFUSED = KafkaError.TOPIC_AUTHORIZATION_FAILED


@dataclass(frozen=True)
class SecureKafka:
    bootstrap: str
    users: dict[str, str]


def _free_port_pair() -> int:
    """A port that is free now, with the one after it (the controller's) free too."""
    while True:
        with socket.socket() as first:
            first.bind((HOST, 0))
            port = int(first.getsockname()[1])
            try:
                with socket.socket() as second:
                    second.bind((HOST, port + 1))
                    return port
            except OSError:
                continue


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    home = tmp_path_factory.mktemp("sasl-kafka")
    users = ensure_kafka_users(home)
    assert (home / "kafka-users.json").stat().st_mode & 0o777 == 0o600
    port = _free_port_pair()
    services.start_kafka(HOST, port, home, load_settings().cache_dir, timeout=240,
                         users=users)
    try:
        for private in ("server.properties", "stdout.log"):  # admin password, SCRAM keys
            assert (home / "kafka" / private).stat().st_mode & 0o777 == 0o600, private
        yield SecureKafka(f"{HOST}:{port}", users)
    finally:
        services.stop_kafka(home)


def as_user(settings: Settings, kafka: SecureKafka, user: str) -> Settings:
    return settings.model_copy(update={
        "kafka_bootstrap": kafka.bootstrap, "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_username": user, "kafka_password": kafka.users[user]})


@pytest.fixture
def workers(settings: Settings, secure_kafka: SecureKafka) -> Settings:
    """This test's settings signed in as ``workers``, its prefix's ACLs applied, topics made."""
    count = apply_acls(admin_config(secure_kafka.bootstrap, secure_kafka.users),
                       settings.topic_prefix)
    assert count == 28
    signed_in = as_user(settings, secure_kafka, "workers")
    prepare_topics(signed_in)  # as workers: creating the prefix's topics is theirs
    return signed_in


def request(n: int) -> OperationRequested:
    return OperationRequested(
        request_id=f"req-{uuid.uuid4()}", client_id=f"client-{n}", provider="simulated",
        operation_type="image_generation", model="gemini-2.5-flash-image",
        params={"prompt": f"a lighthouse, take {n}"})


def refusals(producer: EventProducer) -> list[int]:
    """Flush ``producer`` and return the error code of each event Kafka refused."""
    with pytest.raises(DeliveryError) as refused:
        producer.flush()
    return [error.code() for _, error in refused.value.failures]


def test_upstream_may_request_but_not_forge_completions_or_budgets(
    workers: Settings, secure_kafka: SecureKafka
) -> None:
    topics = workers.topics
    upstream = kafka_config(as_user(workers, secure_kafka, "upstream"))
    wanted = request(1)
    with EventProducer(workers.kafka_bootstrap, **upstream) as producer:
        producer.send(topics.requested, wanted)
        producer.flush()
        assert producer.delivered == 1

    forged = OperationCompleted(
        request_id=wanted.request_id, client_id=wanted.client_id,
        operation_id=wanted.event_id, requested_at=datetime.now(UTC),
        operation_type="image_generation", provider="simulated", model=wanted.model,
        success=True, cost_usd=Decimal("0.000000001"), price_version="forged", duration_ms=1)
    budget = BudgetSet(request_id="req-budget", client_id=wanted.client_id,
                       amount_usd=Decimal("1000000"))
    producer = EventProducer(workers.kafka_bootstrap, **upstream,
                             **{"message.timeout.ms": 20000})
    producer.send(topics.completed, forged)
    producer.send(topics.budgets, budget)
    assert refusals(producer) == [REFUSED, REFUSED]

    # not idempotent: a principal that may write no topic at all is refused a producer id
    # before anything is sent (CLUSTER_AUTHORIZATION_FAILED, fatal to the client)
    analysts = kafka_config(as_user(workers, secure_kafka, "analysts"))
    producer = EventProducer(workers.kafka_bootstrap, **analysts,
                             **{"enable.idempotence": False, "message.timeout.ms": 20000})
    producer.send(topics.requested, request(2))
    assert refusals(producer) == [REFUSED]

    # what reached the topics: the one request, read by analysts (reading is theirs)
    reader = Consumer({**analysts, "bootstrap.servers": workers.kafka_bootstrap,
                       "group.id": f"{workers.topic_prefix}-analysts-check",
                       "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        seen: list[bytes] = []
        reader.subscribe([topics.requested])
        wait_for(lambda: bool(seen.extend(m.value() for m in reader.consume(10, 0.5)
                                          if m.error() is None)) or len(seen) >= 1,
                 60, "the request, read back as analysts")
        assert [decode(value) for value in seen] == [wanted]
        for topic in (topics.completed, topics.budgets):
            for partition in range(workers.partitions):
                ends = reader.get_watermark_offsets(TopicPartition(topic, partition), 10)
                assert ends == (0, 0), (topic, partition)
    finally:
        reader.close()


def test_workers_run_the_pipeline_for_upstream(
    workers: Settings, secure_kafka: SecureKafka, tmp_path: Path
) -> None:
    costs = WorkerProcess(workers, "costs").start()
    streams = WorkerProcess(workers, "streams").start()
    try:
        upstream = kafka_config(as_user(workers, secure_kafka, "upstream"))
        with ResultClient(workers.kafka_bootstrap, workers.topics, auth=upstream) as results:
            wanted = request(3)
            outcome = results.submit_blocking(wanted, timeout=90)
        assert isinstance(outcome, OperationCompleted), outcome
        assert outcome.success and outcome.operation_id == wanted.event_id
        store = store_of(workers, costs)
        wait_recorded(store, 1, timeout=60, worker=costs)
        assert store.totals() == {wanted.client_id: (1, outcome.cost_usd)}
        assert streams.alive(), streams.log_tail()
    finally:
        streams.stop()
        costs.stop()

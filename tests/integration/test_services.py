"""The local Kafka and Redis that infra/services.py starts: real processes, real clients."""

from __future__ import annotations

import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from infra import services
from infra.processes import wait_for

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"
CACHE = Path.home() / ".cache" / "aipipe"


def free_port(pairs: int = 1) -> int:
    """A port p with p..p+pairs-1 free on loopback (Kafka also needs p+1)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port: int = probe.getsockname()[1]
        if port + pairs <= 65535 and all(_free(port + i) for i in range(pairs)):
            return port
    raise RuntimeError("no free loopback port")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
        return True


def test_redis_start_ping_stop(tmp_path: Path) -> None:
    port = free_port()
    assert not services.redis_status(HOST, port, tmp_path).running
    assert services.stop_redis(tmp_path) is False  # safe when nothing runs

    status = services.start_redis(HOST, port, tmp_path)
    try:
        assert status.running and status.pid is not None
        assert status.address == f"{HOST}:{port}"
        client = redis.Redis(host=HOST, port=port)
        assert client.ping() is True
        client.close()
        again = services.start_redis(HOST, port, tmp_path)  # does not start a second
        assert again.pid == status.pid
    finally:
        assert services.stop_redis(tmp_path) is True
    assert not services.redis_status(HOST, port, tmp_path).running
    assert not (tmp_path / "redis" / "redis.pid").exists()


def test_redis_sigkill_then_restart(tmp_path: Path) -> None:
    port = free_port()
    first = services.start_redis(HOST, port, tmp_path)
    try:
        assert services.kill_redis(tmp_path, signal.SIGKILL) is True
        assert not services.redis_status(HOST, port, tmp_path).running
        second = services.start_redis(HOST, port, tmp_path)
        assert second.running and second.pid != first.pid
    finally:
        services.stop_redis(tmp_path)


def test_redis_port_taken_fails_with_the_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(services.ServiceError, match=r"redis\.log"):
            services.start_redis(HOST, port, tmp_path, timeout=10)
    services.stop_redis(tmp_path)


def _roundtrip(bootstrap: str) -> None:
    topic = f"services-test-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)

    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"hello")
    assert producer.flush(30) == 0

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "message not consumed before the deadline"
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                break
        assert (msg.key(), msg.value()) == (b"k", b"hello")
    finally:
        consumer.close()


def test_kafka_start_roundtrip_stop_restart(tmp_path: Path) -> None:
    port = free_port(pairs=2)
    bootstrap = f"{HOST}:{port}"
    assert services.stop_kafka(tmp_path) is False

    status = services.start_kafka(HOST, port, tmp_path, CACHE)
    try:
        assert status.running and status.pid is not None
        meta = tmp_path / "kafka" / "data" / "meta.properties"
        formatted = meta.read_text()
        _roundtrip(bootstrap)
        assert services.start_kafka(HOST, port, tmp_path, CACHE).pid == status.pid
    finally:
        assert services.stop_kafka(tmp_path) is True
    wait_for(lambda: not services.kafka_status(HOST, port, tmp_path).running, 30,
             "the stopped broker to stop answering")

    restarted = services.start_kafka(HOST, port, tmp_path, CACHE)  # same data dir
    try:
        assert restarted.running and restarted.pid != status.pid
        assert meta.read_text() == formatted  # not reformatted
        _roundtrip(bootstrap)

        assert services.kill_kafka(tmp_path, signal.SIGKILL) is True  # a crash
        assert not services.kafka_status(HOST, port, tmp_path).running
        recovered = services.start_kafka(HOST, port, tmp_path, CACHE)
        assert recovered.running and meta.read_text() == formatted
        _roundtrip(bootstrap)
    finally:
        services.stop_kafka(tmp_path)
    assert services.kafka_status(HOST, port, tmp_path).pid is None

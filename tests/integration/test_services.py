"""The local Kafka and Redis that infra/app/services.py starts: real processes, real clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pydantic import SecretStr

from aipipe import services
from aipipe.infra.settings import Settings, home_redis_password
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationAdmitted, OperationRequested, decode
from tests.support.pipeline import consume, produce

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
        assert status.running and status.pid is not None and status.protected
        assert status.address == f"{HOST}:{port}"
        client = redis.Redis(host=HOST, port=port,
                             password=home_redis_password(tmp_path, HOST, port))
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
    password = home_redis_password(tmp_path, HOST, port)
    try:
        assert services.kill_redis(tmp_path, signal.SIGKILL) is True
        assert not services.redis_status(HOST, port, tmp_path).running
        second = services.start_redis(HOST, port, tmp_path)
        assert second.running and second.pid != first.pid and second.protected
        # the same password, so clients holding the URL reconnect after a restart
        assert home_redis_password(tmp_path, HOST, port) == password
        assert redis.Redis(host=HOST, port=port, password=password).ping() is True
    finally:
        services.stop_redis(tmp_path)


def _raw(port: int, *commands: bytes) -> list[bytes]:
    """Each command's first reply line, as a client with no library would see it."""
    replies = []
    with socket.create_connection((HOST, port), timeout=5) as conn:
        for command in commands:
            conn.sendall(command + b"\r\n")
            replies.append(conn.recv(4096).split(b"\r\n")[0])
    return replies


def test_redis_refuses_a_client_without_the_password(tmp_path: Path) -> None:
    port = free_port()
    status = services.start_redis(HOST, port, tmp_path)
    try:
        kept = tmp_path / "redis.json"
        password = home_redis_password(tmp_path, HOST, port)
        assert password and json.loads(kept.read_text())["port"] == port
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "redis" / "redis.conf").stat().st_mode) == 0o600
        assert status.pid is not None
        assert password.encode() not in Path(f"/proc/{status.pid}/cmdline").read_bytes()

        assert _raw(port, b"PING", b"GET x", b"CONFIG GET *") == [
            b"-NOAUTH Authentication required."] * 3
        assert _raw(port, b"AUTH wrong")[0].startswith(b"-WRONGPASS")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=HOST, port=port).ping()
        assert _raw(port, f"AUTH {password}".encode(), b"PING") == [b"+OK", b"+PONG"]

        client = redis.Redis(host=HOST, port=port, password=password, decode_responses=True)
        assert client.config_get("protected-mode") == {"protected-mode": "yes"}
        assert client.config_get("bind") == {"bind": HOST}
        client.close()
        assert services.redis_status(HOST, port, tmp_path).protected
        with pytest.raises(services.ServiceError, match="loopback only"):
            services.start_redis("0.0.0.0", free_port(), tmp_path / "elsewhere")
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


def _cli(home: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "aipipe", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env,
                                                       "AIPIPE_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_aipipe_up_protects_redis_and_no_worker_logs_its_password(
    settings: Settings, tmp_path: Path
) -> None:
    """``aipipe up`` on a fresh home: Redis refuses clients without the password; a worker
    given the password-less URL finds the password under its home, decides through Redis,
    and no line it logs (at debug level) carries the password."""
    home, port = tmp_path / "fresh", free_port()
    bare_url = f"redis://{HOST}:{port}/0"
    env = {"AIPIPE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "AIPIPE_REDIS_URL": bare_url,
           "AIPIPE_ENV": "production"}
    shown = _cli(home, env, "up")
    try:
        password = home_redis_password(home, HOST, port)
        assert password is not None
        assert _raw(port, b"PING") == [b"-NOAUTH Authentication required."]
        status = _cli(home, env, "status")
        assert f"redis  {HOST}:{port}" in status and "password in" in status, status
        assert "no password" not in status

        worker_settings = settings.model_copy(update={
            "home": home, "redis_url": SecretStr(bare_url), "log_level": "debug",
            # a refused password fails at once; only a slow machine would time out
            "rate_limit_redis_timeout_ms": 5000,
        })
        prepare_topics(worker_settings)
        worker = WorkerProcess(worker_settings, "streams").start()
        try:
            requests = [OperationRequested(
                request_id=f"r{i}", client_id=f"c{i % 3}", operation_type="image_generation",
                model="gemini-2.5-flash-image", provider="simulated",
                params={"prompt": "a chair"}) for i in range(20)]
            produce(worker_settings, worker_settings.topics.requested, requests)
            decided = [decode(m.value()) for m in consume(
                worker_settings, worker_settings.topics.admitted, len(requests), timeout=180)]
            assert worker.alive(), worker.log_tail()
        finally:
            worker.stop()
        assert len(decided) == len(requests), worker.log_tail()
        assert {d.backend for d in decided if isinstance(d, OperationAdmitted)} == {"redis"}
        keys = redis.Redis(host=HOST, port=port, password=password).keys(
            f"{settings.topic_prefix}:ratelimit:*")
        assert keys

        logged = worker.log_path.read_text()
        assert "rate_limiter_failover" not in logged and len(logged.splitlines()) > 10
        for text in (logged, shown, status):
            assert password not in text and quote(password, safe="") not in text
    finally:
        services.stop_redis(home)


def test_settings_take_the_password_from_the_home_and_never_show_it(tmp_path: Path) -> None:
    (tmp_path / "redis.json").write_text(json.dumps(
        {"host": HOST, "port": 6390, "password": "pa/ss"}))
    found = Settings(home=tmp_path, redis_url=SecretStr("redis://localhost:6390/1"),
                     clickhouse_url=SecretStr("http://u:ch-secret@127.0.0.1:8123"))
    assert found.redis_dsn == "redis://:pa%2Fss@localhost:6390/1"
    assert found.redis_password == "pa/ss"
    assert found.to_env()["AIPIPE_REDIS_URL"] == found.redis_dsn  # children get the real one
    assert found.to_env()["AIPIPE_CLICKHOUSE_URL"] == "http://u:ch-secret@127.0.0.1:8123"
    for shown in (repr(found), str(found), str(found.model_dump()), found.model_dump_json()):
        assert "pa%2Fss" not in shown and "ch-secret" not in shown
    # another port, or a URL with its own password: left as given
    assert Settings(home=tmp_path, redis_url=SecretStr("redis://127.0.0.1:6391/0")
                    ).redis_password is None
    assert Settings(home=tmp_path, redis_url=SecretStr("redis://:own@127.0.0.1:6390/0")
                    ).redis_password == "own"

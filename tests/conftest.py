"""Where the tests get their services, from one place.

By default: the local Kafka and Redis that the project's own scripts start (``aipipe up``;
started here too when they are not running). With ``AIPIPE_TEST_SERVICES=containers`` on
a machine with Docker: testcontainers (Kafka, Redis, a ClickHouse server).

Each test gets its own topic prefix and its own AIPIPE_HOME (so its own chDB path),
and reads ClickHouse through the worker's read endpoint, never by opening the path.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aipipe.infra.settings import Settings, load_settings


@dataclass(frozen=True)
class Services:
    kafka_bootstrap: str
    redis_url: str
    clickhouse_url: str  # "" = embedded chDB under each test's home


def _local_services() -> Services:
    from aipipe import services

    base = load_settings()
    base.home.mkdir(parents=True, exist_ok=True)
    # one starter at a time: with pytest-xdist each worker process runs this fixture, and
    # two that both find Kafka down must not both start it on the same data dir
    with (base.home / "test-services.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        services.start_kafka(*base.kafka_host_port, home=base.home, cache_dir=base.cache_dir)
        services.start_redis(*base.redis_host_port, home=base.home,
                             password=base.redis_password)
    # read again: a Redis started just now keeps its password under the home
    return Services(base.kafka_bootstrap, load_settings().redis_dsn, "")


def _container_services() -> Iterator[Services]:  # pragma: no cover - needs Docker
    from testcontainers.clickhouse import ClickHouseContainer
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    with (
        KafkaContainer().with_kraft() as kafka,
        RedisContainer() as redis,
        ClickHouseContainer() as clickhouse,
    ):
        host, port = redis.get_container_host_ip(), redis.get_exposed_port(6379)
        ch_host, ch_port = clickhouse.get_container_host_ip(), clickhouse.get_exposed_port(8123)
        yield Services(
            kafka.get_bootstrap_server(),
            f"redis://{host}:{port}/0",
            f"http://{clickhouse.username}:{clickhouse.password}@{ch_host}:{ch_port}",
        )


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    if os.environ.get("AIPIPE_TEST_SERVICES") == "containers":
        yield from _container_services()
    else:
        yield _local_services()


@pytest.fixture(scope="session")
def chdb_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The test process's own chDB engine: one path per process, so one per session."""
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path_factory.getbasetemp() / 'chdb'}")
    yield client
    client.close()


@pytest.fixture
def settings(services: Services, tmp_path: Path) -> Settings:
    """Settings for one test: unique topics, consumer groups, home and database."""
    name = f"t{uuid.uuid4().hex[:10]}"
    return Settings(
        home=tmp_path / "home",
        kafka_bootstrap=services.kafka_bootstrap,
        redis_url=services.redis_url,
        clickhouse_url=services.clickhouse_url,
        clickhouse_database=name,
        topic_prefix=name,
        partitions=3,
        query_port=0,
        metrics_port=0,  # a test that scrapes gives its workers their own ports
        sink_batch_size=50,
        sink_batch_seconds=0.3,
        env="production",
        simulated_enabled=True,
    )

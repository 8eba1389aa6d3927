"""Create the pipeline's topics (idempotently) with the configured partitions and retention."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

# confluent_kafka.admin re-exports these without declaring it (mypy's strict re-export rule)
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource
from confluent_kafka.admin._resource import ResourceType
from confluent_kafka.cimpl import NewTopic

from aipipe.producers.producer import LIBRDKAFKA_LOGGER
from aipipe.schemas.errors import AipipeError


class TopicError(AipipeError):
    """A topic could not be created."""


def _admin(config: dict[str, Any]) -> AdminClient:
    """An admin client whose log lines go to Python logging (JSON in a worker), not stderr."""
    with_logger: dict[str, Any] = {**config, "logger": LIBRDKAFKA_LOGGER}
    return AdminClient(with_logger)


def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    partitions: int,
    retention_ms: int = -1,
    replication_factor: int = 1,
    timeout: float = 30.0,
    config: dict[str, str] | None = None,
    client_config: dict[str, str] | None = None,
) -> None:
    """Create each missing topic; topics that exist already are left as they are.
    ``client_config`` adds to the admin client's config (the sign-in, for SASL)."""
    admin = _admin({**(client_config or {}), "bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    configs = config or {"retention.ms": str(retention_ms)}
    if replication_factor >= 3:  # acks=all waits for two replicas: one broker may be lost
        configs = {"min.insync.replicas": str(min_insync_replicas(replication_factor)),
                   **configs}
    wanted = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=replication_factor,
            config=configs,
        )
        for name in topics
        if name not in existing
    ]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"Topic {name} could not be created: {exc}.") from exc
    _wait_led(admin, [t.topic for t in wanted], partitions, timeout)


def _wait_led(admin: AdminClient, names: list[str], partitions: int, timeout: float) -> None:
    """Return once the metadata shows each of ``names`` with all its partitions led.

    A client that starts right after creation may otherwise ask a broker that does not
    know the topic yet: faust raises ``PartitionsMismatch`` on a changelog it sees with
    0 partitions (on a three-broker cluster), and the worker goes down.
    """
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        waiting = [n for n in names if n not in topics or topics[n].error is not None
                   or len(topics[n].partitions) != partitions
                   or any(p.leader < 0 for p in topics[n].partitions.values())]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TopicError(f"Topic {waiting[0]} was created but its partitions have no "
                             f"leader after {timeout:.0f}s; check that the brokers are up.")
        time.sleep(0.1)


def min_insync_replicas(replication_factor: int) -> int:
    """Replicas that must have a write before an ``acks=all`` producer hears it is done:
    2 of 3 or more, so that one broker may be lost without refusing writes; else 1."""
    return 2 if replication_factor >= 3 else 1


def replication_factor_for(
    bootstrap: str, probe_topic: str, wanted: int | None = None, timeout: float = 30.0,
    client_config: dict[str, str] | None = None,
) -> int:
    """The replication factor of the topics aipipe creates.

    ``wanted`` (AIPIPE_REPLICATION_FACTOR) when set; else that of ``probe_topic`` when it
    exists, so that topics created while a broker is down match the first ones; else
    three on a cluster of three or more brokers, else the number of brokers.
    """
    if wanted is not None:
        return wanted
    meta = _admin({**(client_config or {}), "bootstrap.servers": bootstrap}).list_topics(
        timeout=timeout)
    probe = meta.topics.get(probe_topic)
    if probe is not None and probe.error is None and probe.partitions:
        return max(len(p.replicas) for p in probe.partitions.values())
    return max(1, min(3, len(meta.brokers)))


def set_topic_config(
    bootstrap: str, topics: Iterable[str], config: dict[str, str], timeout: float = 30.0,
    client_config: dict[str, str] | None = None,
) -> None:
    """Set ``config`` on existing topics (incrementally: other settings stay as they are)."""
    admin = _admin({**(client_config or {}), "bootstrap.servers": bootstrap})
    entries = [ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
               for key, value in config.items()]
    resources = [ConfigResource(ResourceType.TOPIC, name, incremental_configs=entries)
                 for name in topics]
    if not resources:
        return
    for resource, future in admin.incremental_alter_configs(resources).items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            raise TopicError(f"Topic {resource.name} could not be configured: {exc}.") from exc
    _wait_applied(admin, list(topics), config, timeout)


def _wait_applied(admin: AdminClient, names: list[str], config: dict[str, str],
                  timeout: float) -> None:
    """Return once the broker answers ``config`` for each of ``names``: the controller
    accepts a change before a broker applies it, and a record written in between is
    written under the old settings (a producer's timestamp on a ``LogAppendTime`` topic)."""
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in sorted(pending)]
        for resource, future in admin.describe_configs(resources).items():
            entries = future.result(timeout)
            if all(key in entries and entries[key].value == value
                   for key, value in config.items()):
                pending.discard(resource.name)
        if pending and time.monotonic() > deadline:
            raise TopicError(f"Topics {sorted(pending)} did not take {config} within "
                             f"{timeout:.0f}s.")
        if pending:
            time.sleep(0.05)

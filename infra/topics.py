"""Create the pipeline's topics (idempotently) with the configured partitions and retention."""

from __future__ import annotations

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
    wanted = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=replication_factor,
            config=config or {"retention.ms": str(retention_ms)},
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

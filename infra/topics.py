"""Create the pipeline's topics (idempotently) with the configured partitions and retention."""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from aipipe.schemas.errors import AipipeError


class TopicError(AipipeError):
    """A topic could not be created."""


def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    partitions: int,
    retention_ms: int = -1,
    replication_factor: int = 1,
    timeout: float = 30.0,
    config: dict[str, str] | None = None,
) -> None:
    """Create each missing topic; topics that exist already are left as they are."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
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

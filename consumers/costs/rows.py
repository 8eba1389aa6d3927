"""One ``ai_cost_tracking`` row per completed operation: the pure mapping from the event.

Times are kept at millisecond precision, the precision of the ``DateTime64(3)`` columns,
so a row read back from ClickHouse equals the row that was written.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal

import orjson

from aipipe.schemas.events import OperationCompleted


@dataclass(frozen=True, slots=True)
class CostRow:
    """A row of ``ai_cost_tracking``, fields in column order."""

    operation_id: str
    event_id: str
    client_id: str
    user_id: str | None
    request_id: str
    job_id: str | None
    operation_type: str
    provider: str
    model: str
    cost_usd: Decimal
    price_version: str
    input_tokens: int | None
    output_tokens: int | None
    image_count: int | None
    video_duration_seconds: Decimal | None
    poll_count: int
    metadata: str
    success: bool
    error_message: str | None
    duration_ms: int
    requested_at: datetime
    created_at: datetime
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    client_occurred_at: datetime | None = None  # the client's clock; requested_at bills
    attempt: int = 1  # which run of the generation step (2 and more after a crash)
    # the run's key beside (client_id, operation_id): its admission, requested_at (the
    # default); stored as 1970-01-01 for one requested before migration 0016 (``run_key``)
    admitted_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.admitted_at is None:
            object.__setattr__(self, "admitted_at", self.requested_at)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(CostRow))


LEGACY_RUN = datetime(1970, 1, 1, tzinfo=UTC)


def run_key(requested_at: datetime, legacy_until: datetime) -> datetime:
    """A cost row's ``admitted_at``: ``requested_at``, or ``LEGACY_RUN`` for an operation
    requested at or before ``legacy_until`` (the latest ``requested_at`` stored before
    migration 0016, whose rows have no admission time: a later copy must match them)."""
    return requested_at if requested_at > legacy_until else LEGACY_RUN


def to_millis(moment: datetime) -> datetime:
    """``moment`` in UTC, truncated to the millisecond as ``DateTime64(3)`` stores it."""
    utc = moment.astimezone(UTC)
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


def row_from_completed(
    event: OperationCompleted, topic: str, partition: int, offset: int
) -> CostRow:
    usage = event.usage
    return CostRow(
        operation_id=event.operation_id,
        event_id=event.event_id,
        client_id=event.client_id,
        user_id=event.user_id,
        request_id=event.request_id,
        job_id=event.job_id,
        operation_type=event.operation_type,
        provider=event.provider,
        model=event.model,
        cost_usd=event.cost_usd,
        price_version=event.price_version,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        image_count=usage.image_count,
        video_duration_seconds=usage.video_seconds,
        poll_count=event.poll_count,
        metadata=orjson.dumps(event.metadata, default=str, option=orjson.OPT_SORT_KEYS).decode(),
        success=event.success,
        error_message=event.error_message,
        duration_ms=event.duration_ms,
        requested_at=to_millis(event.requested_at),
        created_at=to_millis(event.occurred_at),
        kafka_topic=topic,
        kafka_partition=partition,
        kafka_offset=offset,
        client_occurred_at=(to_millis(event.client_occurred_at)
                            if event.client_occurred_at is not None else None),
        attempt=event.attempt,
        admitted_at=to_millis(event.requested_at),
    )

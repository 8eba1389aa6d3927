"""A cost row with sensible defaults, for tests of the store and the read endpoint."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from aipipe.consumers.costs.rows import CostRow
from aipipe.schemas.events import OperationCompleted

T0 = datetime(2025, 11, 1, tzinfo=UTC)


def cost_row(
    operation_id: str,
    cost: str | Decimal = "0.039",
    *,
    client_id: str = "acme",
    created_at: datetime = T0,
    requested_at: datetime | None = None,
    operation_type: str = "image_generation",
    model: str = "gemini-2.5-flash-image",
    success: bool = True,
    event_id: str | None = None,
    offset: int = 0,
) -> CostRow:
    return CostRow(
        operation_id=operation_id,
        event_id=event_id or f"evt-{operation_id}",
        client_id=client_id,
        user_id=None,
        request_id=f"req-{operation_id}",
        job_id=None,
        operation_type=operation_type,
        provider="simulated",
        model=model,
        cost_usd=Decimal(cost),
        price_version="2025-10-01",
        input_tokens=12,
        output_tokens=1290,
        image_count=1,
        video_duration_seconds=None,
        poll_count=0,
        metadata="{}",
        success=success,
        error_message=None if success else "failed",
        duration_ms=120,
        requested_at=requested_at or created_at - timedelta(seconds=2),
        created_at=created_at,
        kafka_topic="aipipe.operations.completed",
        kafka_partition=0,
        kafka_offset=offset,
    )


def totals_of(events: list[OperationCompleted]) -> dict[str, tuple[int, Decimal]]:
    """(operations, cost) per client of ``events``: what their cost rows must add up to."""
    totals: dict[str, tuple[int, Decimal]] = defaultdict(lambda: (0, Decimal(0)))
    for e in events:
        count, cost = totals[e.client_id]
        totals[e.client_id] = (count + 1, cost + e.cost_usd)
    return dict(totals)

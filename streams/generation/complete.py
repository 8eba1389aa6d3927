"""The completed event of an operation, from the provider's result and the price table."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from schemas.events import OperationAdmitted, OperationCompleted, derived_event_id
from schemas.prices import PriceTable
from streams.generation.provider import ProviderResult


def completed(
    operation: OperationAdmitted,
    result: ProviderResult,
    prices: PriceTable,
    duration_ms: int,
    now: datetime,
) -> OperationCompleted:
    cost = prices.cost(operation.model, result.usage) if result.success else Decimal(0)
    return OperationCompleted(
        **operation.envelope(derived_event_id(operation.operation_id, "completed")),
        occurred_at=now,
        operation_id=operation.operation_id,
        requested_at=operation.requested_at,
        operation_type=operation.operation_type,
        provider=operation.provider,
        model=operation.model,
        success=result.success,
        usage=result.usage,
        cost_usd=cost,
        price_version=prices.version,
        duration_ms=duration_ms,
        error_message=result.error_message,
        metadata=result.metadata,
    )

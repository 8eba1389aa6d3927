"""The completed event of an operation, from the provider's result and the price table."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from aipipe.schemas.events import (
    OperationAdmitted,
    OperationCompleted,
    Usage,
    VideoStarted,
    derived_event_id,
)
from aipipe.schemas.prices import PriceTable
from aipipe.streams.generation.outputs import record
from aipipe.streams.generation.provider import ProviderResult


def completed(
    operation: OperationAdmitted | VideoStarted,
    result: ProviderResult,
    prices: PriceTable,
    duration_ms: int,
    now: datetime,
    poll_count: int = 0,
) -> OperationCompleted:
    """The one completed event of ``operation`` (the same ``event_id`` on every re-run).

    Its ``outputs`` are those of ``result`` that are stored (or referenced); an output
    left with bytes only (no store was configured) is counted in ``outputs_not_stored``.
    """
    cost = prices.cost(operation.model, result.usage) if result.success else Decimal(0)
    outputs = [r for r in map(record, result.outputs) if r is not None]
    metadata = dict(result.metadata)
    if len(outputs) < len(result.outputs):
        metadata["outputs_not_stored"] = len(result.outputs) - len(outputs)
    return OperationCompleted(
        **operation.envelope(derived_event_id(operation.operation_id, "completed")),
        occurred_at=now,
        operation_id=operation.operation_id,
        requested_at=operation.requested_at,
        client_occurred_at=operation.client_occurred_at,
        callback_url=operation.callback_url,
        operation_type=operation.operation_type,
        provider=operation.provider,
        model=operation.model,
        success=result.success,
        usage=result.usage,
        cost_usd=cost,
        price_version=prices.version,
        duration_ms=max(0, duration_ms),
        error_message=result.error_message,
        poll_count=poll_count,
        metadata=metadata,
        outputs=outputs,
    )


def failed(reason: str, message: str, **metadata: Any) -> ProviderResult:
    """A failed result: ``reason`` is a stable word for queries, ``message`` says what happened."""
    return ProviderResult(
        success=False, usage=Usage(), error_message=message,
        metadata={"reason": reason, **metadata},
    )

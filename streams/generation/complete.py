"""The completed event of an operation, from the provider's result and the price table."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from aipipe.schemas.deadletter import cut_reason
from aipipe.schemas.events import (
    OperationAdmitted,
    OperationCompleted,
    Usage,
    VideoStarted,
    operation_event_id,
)
from aipipe.schemas.prices import PriceTable
from aipipe.streams.generation.outputs import record
from aipipe.streams.generation.provider import ProviderResult

#: a provider's string (an error, an id, a finish reason) as an event keeps it, in characters
MAX_PROVIDER_TEXT = 1000
#: levels of nesting and items per level kept of a provider's metadata below the event's
METADATA_DEPTH, METADATA_ITEMS = 4, 50
#: metadata past this many bytes of JSON keeps its scalar values only
METADATA_BYTES = 16 * 1024
_INT64 = 2 ** 63


def cut(text: str | None) -> str | None:
    """``text`` at most ``MAX_PROVIDER_TEXT`` characters (the rest said, not kept)."""
    return None if text is None else cut_reason(text, MAX_PROVIDER_TEXT)


def bounded(value: Any, depth: int = 1) -> Any:
    """A provider's value as an event may carry it: strings cut, at most ``METADATA_DEPTH``
    levels of ``METADATA_ITEMS`` items, integers within 64 bits, anything else as text.

    What a provider answers goes into the completion, which must stay a valid event under
    the producer's size limit: an error code of a megabyte made the completion too large
    to send (the worker stopped, and stopped again on the re-run after its restart), and
    metadata nested 40 deep made it one that no consumer decodes (its cost row was lost)."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else cut(str(value))
    if isinstance(value, str):
        return cut(value)
    if isinstance(value, dict | list | tuple):
        if depth >= METADATA_DEPTH:
            return f"({type(value).__name__} of {len(value)} items, nested too deep to keep)"
        if isinstance(value, dict):
            return {str(cut(str(k))): bounded(v, depth + 1)
                    for k, v in list(value.items())[:METADATA_ITEMS]}
        return [bounded(v, depth + 1) for v in list(value)[:METADATA_ITEMS]]
    return cut(str(value))


def bounded_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = bounded(dict(metadata))
    if len(orjson.dumps(kept, default=str)) > METADATA_BYTES:
        kept = {k: v if not isinstance(v, dict | list) else "(cut: the metadata was too large)"
                for k, v in kept.items()}
    return kept


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
    left with bytes only (no store was configured) is counted in ``outputs_not_stored``;
    usage that is missing or implausible (``prices.usage_problem``) is named in
    ``usage_problem``.
    """
    cost = prices.cost(operation.model, result.usage) if result.success else Decimal(0)
    outputs = [r for r in map(record, result.outputs) if r is not None]
    metadata = bounded_metadata(result.metadata)
    if len(outputs) < len(result.outputs):
        metadata["outputs_not_stored"] = len(result.outputs) - len(outputs)
    if result.success and (problem := prices.usage_problem(operation.model, result.usage)):
        metadata["usage_problem"] = problem  # priced as reported, flagged to reconcile
    return OperationCompleted(
        **operation.envelope(
            operation_event_id(operation.client_id, operation.operation_id, "completed")),
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
        error_message=cut(result.error_message),
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

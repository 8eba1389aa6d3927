"""The admission decision, a pure function of the request and the price table.

For now every operation that can be priced is admitted; rate limits and budgets are
the next steps of admission and plug in here as further checks.
"""

from __future__ import annotations

from schemas.errors import PricingError
from schemas.events import (
    OperationAdmitted,
    OperationRejected,
    OperationRequested,
    derived_event_id,
)
from schemas.prices import PriceTable

Decision = OperationAdmitted | OperationRejected


def decide(request: OperationRequested, prices: PriceTable) -> Decision:
    spec = request.model_dump(include={"operation_type", "provider", "model", "params"})
    try:
        prices.price(request.model)
    except PricingError as exc:
        return OperationRejected(
            **request.envelope(derived_event_id(request.event_id, "rejected")),
            **spec,
            operation_id=request.event_id,
            requested_at=request.occurred_at,
            reason="invalid",
            detail=str(exc),
        )
    return OperationAdmitted(
        **request.envelope(derived_event_id(request.event_id, "admitted")),
        **spec,
        operation_id=request.event_id,
        requested_at=request.occurred_at,
    )

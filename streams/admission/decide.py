"""The admission decisions as events: pure functions of the request and what was found.

In order: a request whose model has no price is ``invalid``; a client whose spend has
reached its budget is ``over_budget``; then the rate limiter's outcome decides
(``rate_limited`` with ``retry_after_ms``, or admitted). Every decision event carries a
deterministic ``event_id``, and the facts that decided it (backend, limit, window).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.errors import PricingError
from schemas.events import (
    OperationAdmitted,
    OperationRejected,
    OperationRequested,
    derived_event_id,
)
from schemas.prices import PriceTable
from streams.admission.limiter import Backend
from streams.admission.window import CLIENT, MODEL, Check, Limit, Outcome

Decision = OperationAdmitted | OperationRejected
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _spec(request: OperationRequested) -> dict[str, Any]:
    return request.model_dump(include={"operation_type", "provider", "model", "params"})


def admitted(request: OperationRequested, **facts: Any) -> OperationAdmitted:
    return OperationAdmitted(
        **request.envelope(derived_event_id(request.event_id, "admitted")),
        **_spec(request),
        operation_id=request.event_id,
        requested_at=request.occurred_at,
        **facts,
    )


def rejected(
    request: OperationRequested, reason: str, detail: str, **facts: Any
) -> OperationRejected:
    return OperationRejected(
        **request.envelope(derived_event_id(request.event_id, "rejected")),
        **_spec(request),
        operation_id=request.event_id,
        requested_at=request.occurred_at,
        reason=reason,  # type: ignore[arg-type]
        detail=detail,
        **facts,
    )


def invalid(request: OperationRequested, prices: PriceTable) -> OperationRejected | None:
    """The ``invalid`` rejection of a request the price table cannot price, else None."""
    try:
        prices.price(request.model)
    except PricingError as exc:
        return rejected(request, "invalid", str(exc))
    return None


def decide(request: OperationRequested, prices: PriceTable) -> Decision:
    """Admit every request that can be priced (no limits, no budget)."""
    return invalid(request, prices) or admitted(request)


def limiter_time(at_us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=at_us)


def rate_decision(
    request: OperationRequested, check: Check, outcome: Outcome | None, backend: Backend
) -> Decision:
    """The event for the limiter's ``outcome`` (``None``: the limiter failed closed)."""
    if outcome is None:
        return rejected(
            request, "rate_limited",
            "The rate limiter's Redis is unavailable and admission fails closed "
            "(AIPIPE_RATE_LIMIT_FAILURE_MODE=closed); retry later.",
            backend="none",
        )
    scopes: list[tuple[str, Limit, int]] = [
        (scope, limit, remaining)
        for scope, limit, remaining in (
            ("client", check.client_limit, outcome.remaining[0]),
            ("model", check.model_limit, outcome.remaining[1]),
        )
        if limit is not None and remaining is not None
    ]
    facts: dict[str, Any] = {"backend": backend, "decided_at": limiter_time(outcome.at_us)}
    if outcome.admitted:
        if scopes:
            scope, limit, remaining = min(scopes, key=lambda s: (s[2], s[0] == "client"))
            facts.update(limited_by=scope, limit=limit.count, window_ms=limit.window_ms,
                         remaining=remaining)
        return admitted(request, **facts)
    by = {CLIENT: "client", MODEL: "model"}[outcome.limited_by]
    refusing = check.client_limit if outcome.limited_by == CLIENT else check.model_limit
    assert refusing is not None
    subject = f"client {request.client_id!r}" if by == "client" else f"model {request.model!r}"
    return rejected(
        request, "rate_limited",
        f"The {by} rate limit of {refusing} for {subject} is used up; retry after "
        f"{outcome.retry_after_ms} ms.",
        limited_by=by, limit=refusing.count, window_ms=refusing.window_ms, remaining=0,
        retry_after_ms=outcome.retry_after_ms, **facts,
    )

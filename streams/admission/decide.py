"""The admission decisions as events: pure functions of the request, the clock and what
was found.

In order: a request that cannot run is ``invalid`` (a provider this deployment does not
offer, a ``callback_url`` not under an allowed webhook URL, params its provider does not
take, an ``occurred_at`` outside the accepted skew, a model without a price); a client
whose spend has reached its budget is ``over_budget``; then the rate limiter's outcome
decides (``rate_limited`` with ``retry_after_ms``, or admitted). Every decision event
carries a deterministic ``event_id``, the facts that decided it (backend, limit, window),
``requested_at`` from the pipeline's clock (it picks the price table and the month), the
client's own ``occurred_at`` as ``client_occurred_at``, and its ``callback_url`` (except
the rejection of that very URL).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aipipe.schemas.errors import PricingError
from aipipe.schemas.events import (
    OperationAdmitted,
    OperationRejected,
    OperationRequested,
    operation_event_id,
    shown,
    utcnow,
)
from aipipe.schemas.limits import Limit
from aipipe.schemas.prices import PriceTable, price_table_at
from aipipe.schemas.providers import KNOWN_PROVIDERS
from aipipe.streams.admission.limiter import Backend
from aipipe.streams.admission.params import (
    ParamLimits,
    callback_problem,
    params_problem,
)
from aipipe.streams.admission.window import CLIENT, MODEL, Check, Outcome

Decision = OperationAdmitted | OperationRejected
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)  # an occurred_at before this is a broken clock


@dataclass(frozen=True)
class Rules:
    """What admission holds a request to, from settings (``build_gate``)."""

    providers: Collection[str] = KNOWN_PROVIDERS  # the offered ones
    params: ParamLimits = field(default_factory=ParamLimits)
    max_ahead: timedelta = timedelta(minutes=5)  # AIPIPE_CLOCK_SKEW_SECONDS
    # an occurred_at older than this may be a request already run and forgotten since:
    # AIPIPE_DEDUP_HORIZON_HOURS less AIPIPE_CLOCK_SKEW_SECONDS (None: no limit)
    max_age: timedelta | None = None
    callback_prefixes: tuple[str, ...] = ()  # AIPIPE_WEBHOOK_ALLOWED_URLS


def _spec(request: OperationRequested, keep_params: bool = True) -> dict[str, Any]:
    spec = {"operation_type": request.operation_type, "provider": request.provider,
            "model": request.model}
    return {**spec, "params": request.params} if keep_params else spec


def admitted(request: OperationRequested, now: datetime, **facts: Any) -> OperationAdmitted:
    return OperationAdmitted(
        **request.envelope(operation_event_id(request.client_id, request.event_id, "admitted")),
        **_spec(request),
        operation_id=request.event_id,
        requested_at=now,
        client_occurred_at=request.occurred_at,
        callback_url=request.callback_url,
        **facts,
    )


def rejected(
    request: OperationRequested, now: datetime, reason: str, detail: str,
    keep_params: bool = True, keep_callback: bool = True, **facts: Any,
) -> OperationRejected:
    """The rejection; without ``keep_params`` it carries no params (they were the problem),
    without ``keep_callback`` no ``callback_url`` (it was the problem: nothing calls it)."""
    return OperationRejected(
        **request.envelope(operation_event_id(request.client_id, request.event_id, "rejected")),
        **_spec(request, keep_params),
        operation_id=request.event_id,
        requested_at=now,
        client_occurred_at=request.occurred_at,
        callback_url=request.callback_url if keep_callback else None,
        reason=reason,  # type: ignore[arg-type]
        detail=detail,
        **facts,
    )


def clock_problem(occurred_at: datetime, now: datetime, max_ahead: timedelta,
                  max_age: timedelta | None = None) -> str | None:
    """Why the client's ``occurred_at`` is not believable, or ``None``.

    Any time since 2000 up to ``max_ahead`` past the pipeline's clock is accepted and kept;
    it never bills (``requested_at`` does). A time older than ``max_age`` is refused: the
    streams remember a request for the dedup horizon after deciding it, and a request
    decided at D has ``occurred_at`` <= D + ``max_ahead``, so with ``max_age`` = horizon -
    ``max_ahead`` a redelivery is either still remembered (skipped) or refused here, never
    run and billed by the provider a second time.
    """
    when = f"{occurred_at:%Y-%m-%dT%H:%M:%SZ}"
    if occurred_at < EARLIEST:
        return (f"Field 'occurred_at' is {when}, before 2000-01-01; send the time the event "
                "happened, in UTC.")
    if max_age is not None and occurred_at < now - max_age:
        return (f"Field 'occurred_at' is {when}, older than the {_span(max_age)} this "
                "pipeline remembers requests for, so it may have run already; send a new "
                "request with a new event_id if it is still wanted.")
    if occurred_at > now + max_ahead:
        return (f"Field 'occurred_at' is {when}, more than {max_ahead.total_seconds():g} s "
                f"ahead of the pipeline's clock ({now:%Y-%m-%dT%H:%M:%SZ}); send the time the "
                "event happened, in UTC, from a synchronised clock.")
    return None


def _span(length: timedelta) -> str:
    seconds = length.total_seconds()
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


def invalid(
    request: OperationRequested, now: datetime, prices: PriceTable, rules: Rules | None = None
) -> OperationRejected | None:
    """The ``invalid`` rejection of a request that cannot run as asked, else None."""
    rules = rules or Rules()
    if request.provider not in rules.providers:
        offered = ", ".join(sorted(rules.providers)) or "none"
        # no params on a rejection decided before their limits are checked: a request near
        # the size limit would make a rejection over the producer's (the worker died on it)
        return rejected(request, now, "invalid",
                        f"Provider {shown(request.provider, 40)} is not offered here; use one "
                        f"of: {offered}.", keep_params=False)
    problem = callback_problem(request.callback_url, rules.callback_prefixes)
    if problem is not None:
        return rejected(request, now, "invalid", problem, keep_params=False,
                        keep_callback=False)
    problem = params_problem(request.provider, request.operation_type, request.params,
                             rules.params)
    if problem is not None:
        return rejected(request, now, "invalid", problem, keep_params=False)
    problem = clock_problem(request.occurred_at, now, rules.max_ahead, rules.max_age)
    if problem is not None:
        return rejected(request, now, "invalid", problem)
    try:
        prices.price(request.model)
    except PricingError as exc:
        return rejected(request, now, "invalid", str(exc))
    return None


def undecidable(request: OperationRequested, now: datetime, exc: BaseException) -> Decision:
    """The ``invalid`` rejection of a request whose decision raised: it alone is refused.

    It carries no params (they may be what broke the decision).
    """
    return rejected(
        request, now, "invalid",
        f"Admission could not decide this request ({type(exc).__name__}: "
        f"{shown(str(exc), 200)}); fix the request or report it with its request_id.",
        keep_params=False,
    )


def decide(
    request: OperationRequested, now: datetime | None = None, rules: Rules | None = None,
    prices: PriceTable | None = None,
) -> Decision:
    """Admit every request that can run and be priced (no limits, no budget)."""
    now = now or utcnow()
    prices = prices or price_table_at(now)
    return invalid(request, now, prices, rules) or admitted(request, now)


def limiter_time(at_us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=at_us)


def rate_decision(
    request: OperationRequested, now: datetime, check: Check, outcome: Outcome | None,
    backend: Backend,
) -> Decision:
    """The event for the limiter's ``outcome`` (``None``: the limiter failed closed)."""
    if outcome is None:
        return rejected(
            request, now, "rate_limited",
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
        return admitted(request, now, **facts)
    by = {CLIENT: "client", MODEL: "model"}[outcome.limited_by]
    refusing = check.client_limit if outcome.limited_by == CLIENT else check.model_limit
    assert refusing is not None
    subject = f"client {request.client_id!r}" if by == "client" else f"model {request.model!r}"
    return rejected(
        request, now, "rate_limited",
        f"The {by} rate limit of {refusing} for {subject} is used up; retry after "
        f"{outcome.retry_after_ms} ms.",
        limited_by=by, limit=refusing.count, window_ms=refusing.window_ms, remaining=0,
        retry_after_ms=outcome.retry_after_ms, **facts,
    )

"""The admission gate: decide a batch of requests with one limiter round trip.

Validity first (an offered provider, params it takes, a believable ``occurred_at``, a
price for the model), then the budget (ClickHouse, cached), then the rate limits (client
and model) for what is left, all of those in one ``decide`` call of the limiter. Every
request gets its decision whatever its neighbours hold: a request whose decision raises
is rejected as ``invalid`` on its own. ``build_gate`` wires the real adapters from
settings and the budget store the program opens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

import structlog

from aipipe.consumers.costs.budgets import BudgetStore
from aipipe.infra.settings import Settings
from aipipe.schemas.events import (
    BudgetThresholdCrossed,
    OperationAdmitted,
    OperationRequested,
    operation_key,
    utcnow,
)
from aipipe.schemas.limits import parse_limit
from aipipe.schemas.prices import PriceTable, price_table_at
from aipipe.streams.admission.budgets import BudgetGate, BudgetState, RedisLatch
from aipipe.streams.admission.decide import (
    Decision,
    Rules,
    invalid,
    rate_decision,
    rejected,
    undecidable,
)
from aipipe.streams.admission.limiter import (
    FailoverLimiter,
    MemoryRateLimitStore,
    RedisRateLimitStore,
    redis_client,
)
from aipipe.streams.admission.limits import LimitsSource
from aipipe.streams.admission.params import ParamLimits
from aipipe.streams.admission.window import Check

log = structlog.get_logger("aipipe.admission")


@dataclass
class Decided:
    """Decisions in request order, and the budget notices the batch called for."""

    decisions: list[Decision] = field(default_factory=list)
    notices: list[BudgetThresholdCrossed] = field(default_factory=list)


def limiter_keys(prefix: str) -> tuple[str, str]:
    """Key prefixes of the client and the model logs in Redis."""
    return f"{prefix}:ratelimit:client:", f"{prefix}:ratelimit:model:"


class AdmissionGate:
    def __init__(
        self,
        limiter: FailoverLimiter,
        limits: LimitsSource,
        budgets: BudgetGate | None,
        key_prefix: str,
        prices_at: Callable[[datetime], PriceTable] = price_table_at,
        rules: Rules | None = None,
    ) -> None:
        self.limiter = limiter
        self.limits = limits
        self.budgets = budgets
        self.client_prefix, self.model_prefix = limiter_keys(key_prefix)
        self.prices_at = prices_at
        self.rules = rules or Rules()

    def check(self, request: OperationRequested) -> Check:
        limits = self.limits.current()
        return Check(
            # the client's own request: a duplicate (admitted again without a slot) is the
            # same client's same event_id; another client reusing an admitted id, in the
            # model's shared log, is a new request that needs a slot of its own
            member=operation_key(request.client_id, request.event_id),
            client_key=self.client_prefix + request.client_id,
            client_limit=limits.for_client(request.client_id),
            model_key=self.model_prefix + request.model,
            model_limit=limits.for_model(request.model),
        )

    async def fallback_slot(self, operation: OperationAdmitted) -> bool:
        """A slot in the model log of the fallback ``operation`` is about to run on.

        Admission counted the request against the model it asked for; a fallback is
        another provider's quota, which the operations of a model whose circuit is open
        would otherwise all land on, unlimited. The same operation asking again (a re-run)
        is a duplicate in the log and takes no second slot. Failing closed with Redis
        down refuses it."""
        limit = self.limits.current().for_model(operation.model)
        if limit is None:
            return True
        member = f"{operation_key(operation.client_id, operation.operation_id)}\x1ffallback"
        _, outcomes = await self.limiter.decide([Check(
            member=member, client_key=self.client_prefix + operation.client_id,
            client_limit=None, model_key=self.model_prefix + operation.model,
            model_limit=limit)])
        return outcomes is not None and outcomes[0].admitted

    async def decide(
        self, requests: Sequence[OperationRequested], now: datetime | None = None
    ) -> Decided:
        """One decision per request, in order; ``now`` (the pipeline's clock) bills them."""
        now = now or utcnow()
        out = Decided()
        decisions: dict[int, Decision] = {}
        valid: list[tuple[int, OperationRequested]] = []
        for i, request in enumerate(requests):
            try:
                refused = invalid(request, now, self.prices_at(now), self.rules)
            except Exception as exc:  # one request's problem, never its batch's
                decisions[i] = self._undecidable(request, now, exc)
                continue
            if refused is not None:
                decisions[i] = refused
            else:
                valid.append((i, request))
        if self.budgets is not None and valid:
            states, out.notices = await self.budgets.states([r for _, r in valid])
            within = []
            for i, request in valid:
                state = states.get(request.client_id)
                try:
                    if state is not None and state.over:
                        decisions[i] = _over_budget(request, now, state)
                    else:
                        within.append((i, request))
                except Exception as exc:
                    decisions[i] = self._undecidable(request, now, exc)
            valid = within
        checked: list[tuple[int, OperationRequested, Check]] = []
        for i, request in valid:
            try:
                checked.append((i, request, self.check(request)))
            except Exception as exc:
                decisions[i] = self._undecidable(request, now, exc)
        if checked:
            backend, outcomes = await self.limiter.decide([c for _, _, c in checked])
            for n, (i, request, check) in enumerate(checked):
                outcome = outcomes[n] if outcomes is not None else None
                try:
                    decisions[i] = rate_decision(request, now, check, outcome, backend)
                except Exception as exc:
                    decisions[i] = self._undecidable(request, now, exc)
        out.decisions = [decisions[i] for i in range(len(requests))]
        return out

    @staticmethod
    def _undecidable(request: OperationRequested, now: datetime, exc: Exception) -> Decision:
        log.warning("admission_undecidable", request_id=request.request_id,
                    client_id=request.client_id, error=type(exc).__name__)
        return undecidable(request, now, exc)


def usd(amount: Decimal) -> str:
    """Dollars with cents, and more places only where the amount has them."""
    exact = amount.normalize()
    exponent = exact.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2:
        return format(exact, "f")
    return format(amount.quantize(Decimal("0.01")), "f")


_ADJECTIVE = {"month": "monthly", "week": "weekly", "day": "daily"}


def _over_budget(request: OperationRequested, now: datetime, state: BudgetState) -> Decision:
    return rejected(
        request, now, "over_budget",
        f"Client {request.client_id!r} has spent ${usd(state.spend_usd)} of its "
        f"${usd(state.budget.amount_usd)} {_ADJECTIVE[state.budget.period]} budget since "
        f"{state.period_start:%Y-%m-%d}; raise it with `aipipe budget set` or wait for "
        "the next period.",
    )


def build_gate(
    settings: Settings, open_budget_store: Callable[[], BudgetStore | None]
) -> AdmissionGate:
    """The gate with its real adapters: Redis for the limits, and the budgets read from the
    store ``open_budget_store`` opens (the wiring's choice: see ``aipipe.reader``)."""
    client = redis_client(settings.redis_dsn, settings.rate_limit_redis_timeout_ms)
    limiter = FailoverLimiter(
        RedisRateLimitStore(client),
        MemoryRateLimitStore(),
        failure_mode=settings.rate_limit_failure_mode,
        probe_seconds=settings.rate_limit_probe_seconds,
    )
    limits = LimitsSource(
        parse_limit(settings.rate_limit, "AIPIPE_RATE_LIMIT"),
        settings.rate_limits_file,
        reload_seconds=settings.rate_limits_reload_seconds,
    )
    budgets = BudgetGate(
        open_budget_store,
        RedisLatch(client, f"{settings.topic_prefix}:budget"),
        default_usd=settings.budget_usd,
        default_period=settings.budget_period,
        cache_seconds=settings.budget_cache_seconds,
        wait_seconds=settings.budget_wait_seconds,
    )
    return AdmissionGate(limiter, limits, budgets, settings.topic_prefix,
                         rules=rules_from_settings(settings))


def rules_from_settings(settings: Settings) -> Rules:
    return Rules(
        providers=frozenset(settings.offered_providers),
        params=ParamLimits(
            max_bytes=settings.params_max_bytes,
            max_depth=settings.params_max_depth,
            prompt_max_chars=settings.prompt_max_chars,
            image_max_count=settings.image_max_count,
            text_max_output_tokens=settings.text_max_output_tokens,
            video_max_seconds=settings.video_max_seconds,
            simulated_max_latency_ms=settings.simulated_max_latency_ms,
            simulated_max_polls=settings.simulated_max_polls,
            video_output_buckets=tuple(
                b.strip() for b in settings.video_output_buckets.split(",") if b.strip()),
        ),
        max_ahead=timedelta(seconds=settings.clock_skew_seconds),
        max_age=(timedelta(hours=settings.dedup_horizon_hours)
                 - timedelta(seconds=settings.clock_skew_seconds)),
        callback_prefixes=settings.webhook_prefixes,
    )

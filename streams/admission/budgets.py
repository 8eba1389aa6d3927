"""Budgets at admission: each client's spend in the period against its budget.

Spend and budgets come from ClickHouse (``aipipe.consumers.costs.budgets.BudgetStore``: the cost
table and ``client_budgets``, read with ``FINAL``), asked for every client of a batch whose
cached answer is older than ``cache_seconds`` in one query each, in a worker thread so
the event loop never waits on ClickHouse. With embedded chDB the worker reads through the
owning process's loopback endpoint and never opens the chDB path itself.

A client is over budget when its spend has reached the budget. Each of 80, 90 and 100 %
is announced once per client and period with ``budget.threshold_crossed``: a Redis
``SET NX`` with a TTL to the end of the period elects the one worker that emits it (a
bounded in-process mapping when Redis is down). Nothing is announced for a budget of 0
(``AIPIPE_BUDGET_USD=0`` denies every client without a row of its own) or before any
spend: such a client is rejected, and a "crossing" at zero spend means nothing.

When ClickHouse cannot be asked, the last answer stays in use, and a client never seen
is admitted (budgets fail open, like the rate limiter); the failure is logged. Admission
never waits on ClickHouse longer than ``wait_seconds``: a lookup still running then
(a slow or wedged endpoint, an analyst's heavy query ahead of it) is left to finish in
its thread, its answer is cached when it comes, and only one lookup runs at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

import structlog
from redis.exceptions import RedisError

from aipipe.consumers.costs.budgets import (
    Budget,
    BudgetStore,
    budget_verdict,
    period_bounds,
    resolve_budget,
    thresholds_reached,
)
from aipipe.schemas.events import (
    BudgetPeriod,
    BudgetThresholdCrossed,
    OperationRequested,
    derived_event_id,
    utcnow,
)

log = structlog.get_logger("aipipe.admission.budgets")


@dataclass(frozen=True)
class BudgetState:
    client_id: str
    budget: Budget
    spend_usd: Decimal
    period_start: datetime
    period_end: datetime

    @property
    def over(self) -> bool:
        return self.spend_usd >= self.budget.amount_usd

    @property
    def crossed(self) -> list[int]:
        """The thresholds to announce: none at a budget of 0 or at no spend (a client_id is
        whatever a sender writes: three latch keys and notices per fresh id, for free)."""
        if self.budget.amount_usd <= 0 or self.spend_usd <= 0:
            return []
        return thresholds_reached(self.spend_usd, self.budget.amount_usd)


def budget_states(
    store: BudgetStore, clients: Iterable[str], now: datetime,
    default: Decimal | None, default_period: BudgetPeriod,
) -> dict[str, BudgetState | None]:
    """Each client's budget and spend in its current period (``None``: no budget)."""
    wanted = set(clients)
    budgets = store.budgets(wanted)
    if default is not None:
        for client in wanted - set(budgets):
            budgets[client] = Budget(default, default_period, "settings")
    out: dict[str, BudgetState | None] = dict.fromkeys(wanted)
    by_period: dict[BudgetPeriod, list[str]] = {}
    for client, budget in budgets.items():
        by_period.setdefault(budget.period, []).append(client)
    for period, members in by_period.items():
        start, end = period_bounds(period, now)
        for client, spend in store.spend(members, start, end).items():
            out[client] = BudgetState(client, budgets[client], spend, start, end)
    return out


def budget_report(
    store: BudgetStore, client_id: str, now: datetime, default: Decimal | None,
    default_period: BudgetPeriod, override: Decimal | None = None,
) -> dict[str, Any]:
    """What ``aipipe budget check`` shows: spend, budget, and admission's decision."""
    budget = resolve_budget(lambda: store.budgets([client_id]).get(client_id), default,
                            default_period, override)
    period = budget.period if budget is not None else default_period
    bounds = period_bounds(period, now)
    spend = store.spend([client_id], *bounds)[client_id]
    return budget_verdict(client_id, budget, period, bounds, spend)


# how long a client's last known budget state is kept without a request of its own: while
# ClickHouse does not answer, an idle client forgotten is admitted as unknown
CACHE_KEEP_SECONDS = 600.0


class ThresholdLatch(Protocol):
    async def first(self, key: str, ttl_ms: int) -> bool:
        """True for the first caller with ``key`` (until it expires)."""
        ...


# the most keys the in-process latch holds while Redis does not answer (3 MiB at the longest
# client_ids); past it the oldest goes, and its notice may come once more (same event id)
LATCH_LOCAL_MAX = 10_000


class RedisLatch:
    """``SET key 1 NX PX ttl``; while Redis does not answer, an in-process mapping of each
    key to its expiry, in the order set: a key past its TTL counts as absent, the expired
    at the front are dropped, and past ``local_max`` keys the oldest goes."""

    def __init__(self, client: Any, prefix: str, *, local_max: int = LATCH_LOCAL_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.prefix = prefix
        self.local_max = local_max
        self.clock = clock
        self.local: dict[str, float] = {}

    async def first(self, key: str, ttl_ms: int) -> bool:
        try:
            return bool(await self.client.set(f"{self.prefix}:{key}", 1, nx=True, px=ttl_ms))
        except (RedisError, OSError, TimeoutError):
            return self._first_local(key, ttl_ms)

    def _first_local(self, key: str, ttl_ms: int) -> bool:
        moment = self.clock()
        expires = self.local.get(key)
        if expires is not None and expires > moment:
            return False
        self.local.pop(key, None)  # (expired: set again at the back)
        while self.local and (len(self.local) >= self.local_max
                              or next(iter(self.local.values())) <= moment):
            del self.local[next(iter(self.local))]
        self.local[key] = moment + ttl_ms / 1000
        return True


class BudgetGate:
    """Cached budget states per client and the threshold events they call for."""

    def __init__(
        self,
        open_store: Callable[[], BudgetStore | None],
        latch: ThresholdLatch,
        *,
        default_usd: Decimal | None = None,
        default_period: BudgetPeriod = "month",
        cache_seconds: float = 5.0,
        wait_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.open_store = open_store
        self.latch = latch
        self.default_usd = default_usd
        self.default_period = default_period
        self.cache_seconds = cache_seconds
        self.wait_seconds = wait_seconds
        self.clock = clock
        self.now = now
        self._store: BudgetStore | None = None
        self._cache: dict[str, tuple[float, BudgetState | None]] = {}
        self._swept = clock()
        self._failing = False
        self._lookup: asyncio.Future[dict[str, BudgetState | None]] | None = None
        self._asked: set[str] = set()  # the clients the lookup in flight asks about

    def _sweep(self, moment: float) -> None:
        """Forget clients not asked about for ``CACHE_KEEP_SECONDS`` (once a minute at most):
        a client_id is whatever a sender writes, and a new one per request kept an entry
        each for good (100,000 ids, 60 MiB)."""
        if moment - self._swept < 60.0:
            return
        self._swept = moment
        keep = max(CACHE_KEEP_SECONDS, self.cache_seconds)
        self._cache = {c: entry for c, entry in self._cache.items() if moment - entry[0] < keep}

    async def _fresh(self, clients: set[str],
                     moment: float) -> tuple[dict[str, BudgetState | None], set[str]]:
        """Ask ClickHouse about ``clients``, waiting at most ``wait_seconds`` for it: the
        answers, and the clients the lookup asked about. One lookup runs at a time: with one
        in flight (started by an earlier batch, for its clients) this waits for that one."""
        if self._lookup is None:
            started = asyncio.ensure_future(asyncio.to_thread(self._refresh, clients))
            started.add_done_callback(lambda done: self._late(done, moment))
            self._lookup, self._asked = started, set(clients)
        asked = self._asked
        try:
            return await asyncio.wait_for(asyncio.shield(self._lookup), self.wait_seconds), asked
        except TimeoutError:
            log.warning("budget_lookup_slow", wait_seconds=self.wait_seconds,
                        effect="last known spend used; unknown clients admitted")
            return {}, asked

    def _late(self, done: asyncio.Future[dict[str, BudgetState | None]], moment: float) -> None:
        """Cache what a lookup found, also when admission stopped waiting for it."""
        self._lookup = None
        if done.cancelled() or done.exception() is not None:
            return
        for client, state in done.result().items():
            self._cache[client] = (moment, state)

    async def states(
        self, requests: Sequence[OperationRequested]
    ) -> tuple[dict[str, BudgetState | None], list[BudgetThresholdCrossed]]:
        """Budget state of each client in ``requests``, and the threshold events to emit."""
        clients = {r.client_id for r in requests}
        moment = self.clock()
        stale = {c for c in clients
                 if c not in self._cache or moment - self._cache[c][0] >= self.cache_seconds}
        fresh: dict[str, BudgetState | None] = {}
        if stale:
            answers, asked = await self._fresh(stale, moment)
            # (a lookup started for another batch answers for its clients: those of this
            # batch it did not ask about stay stale, and the next batch asks about them)
            fresh = {c: state for c, state in answers.items() if c in stale}
            for client in (stale & asked) - set(fresh):  # asked, no answer: keep what was
                self._cache[client] = (moment, self._cache.get(client, (0.0, None))[1])
            for client, state in fresh.items():
                self._cache[client] = (moment, state)
        states = {c: self._cache[c][1] if c in self._cache else None for c in clients}
        self._sweep(moment)
        first_request = {r.client_id: r for r in reversed(requests)}
        notices = []
        for client, state in fresh.items():
            if state is not None:
                notices += await self._crossed(state, first_request[client])
        return states, notices

    def _refresh(self, clients: set[str]) -> dict[str, BudgetState | None]:
        try:
            if self._store is None:
                self._store = self.open_store()
            if self._store is None:
                raise ConnectionError("no ClickHouse read endpoint is running")
            result = budget_states(self._store, clients, self.now(), self.default_usd,
                                   self.default_period)
        except Exception as exc:  # any read failure: keep the last answers, admit the rest
            self._store = None
            if not self._failing:
                log.warning("budget_lookup_failed", error=str(exc),
                            effect="last known spend used; unknown clients admitted")
            self._failing = True
            return {}
        if self._failing:
            log.warning("budget_lookup_recovered")
        self._failing = False
        return result

    async def _crossed(
        self, state: BudgetState, request: OperationRequested
    ) -> list[BudgetThresholdCrossed]:
        out = []
        start = state.period_start
        ttl_ms = max(int((state.period_end - self.now()).total_seconds() * 1000), 1) + 86_400_000
        for threshold in state.crossed:
            key = f"{state.client_id}:{start:%Y%m%d}:{state.budget.period}:{threshold}"
            if await self.latch.first(key, ttl_ms):
                out.append(BudgetThresholdCrossed(
                    **request.envelope(_notice_id(state, threshold)),
                    threshold_percent=threshold, period=state.budget.period,
                    period_start=start, spend_usd=state.spend_usd,
                    budget_usd=state.budget.amount_usd,
                ))
                log.info("budget_threshold_crossed", client_id=state.client_id,
                         threshold_percent=threshold, spend_usd=str(state.spend_usd),
                         budget_usd=str(state.budget.amount_usd))
        return out


def _notice_id(state: BudgetState, threshold: int) -> str:
    return derived_event_id(
        f"budget:{state.client_id}:{state.period_start.isoformat()}", f"threshold-{threshold}"
    )
